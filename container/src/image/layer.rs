//! Applies image layers (tar streams) to a root directory in order, with the OCI/Docker
//! whiteout rules: `.wh.NAME` deletes NAME from the layers below, `.wh..wh..opq` hides
//! everything below in its directory. Entries of the layer itself always survive, whatever
//! order the tar lists them in.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

/// What can go wrong applying one layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("bad layer entry {0:?}")]
    BadEntry(String),
    #[error("cannot read a layer")]
    Read(#[source] io::Error),
    #[error("cannot unpack {0}")]
    Unpack(PathBuf, #[source] io::Error),
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// The owner each path should have in the final image, relative to the root. Unpacking as
/// root sets owners directly; otherwise the disk builder applies these afterwards.
pub type Owners = BTreeMap<PathBuf, (u64, u64)>;

/// A tar path made relative and free of `.`/`..`; None for the root itself or an escape.
fn clean(path: &Path) -> Result<Option<PathBuf>, LayerError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(LayerError::BadEntry(path.display().to_string()))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Refuses a directory path `dir` (relative to `root`) that goes through a symlink: an earlier
/// layer may have planted `a -> /etc`, and removing `root/a/passwd` would then delete the
/// host's file. (Unpacking itself is checked by the tar crate; removals are ours.)
fn check_no_symlink(root: &Path, dir: &Path) -> Result<(), LayerError> {
    let mut at = root.to_path_buf();
    for part in dir.components() {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(LayerError::BadEntry(format!(
                    "{} (goes through a symbolic link)",
                    dir.display()
                )))
            }
            Ok(_) => {}
            // Nothing there: nothing to remove below it either.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}

/// Removes whatever is at `path` (file, link or whole tree) without following symlinks.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes the lower layers' content of `dir`: everything not written by this layer, keeping
/// directories on the way to paths this layer wrote.
fn clear_lower(root: &Path, dir: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    let entries = match fs::read_dir(root.join(dir)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let rel = dir.join(entry?.file_name());
        let keep = written.iter().any(|w| w.starts_with(&rel));
        if !keep {
            remove_any(&root.join(&rel))?;
        } else if fs::symlink_metadata(root.join(&rel))?.is_dir() {
            clear_lower(root, &rel, written)?;
        }
    }
    Ok(())
}

/// Whiteouts seen in one layer, applied once it has been read.
#[derive(Default)]
struct Whiteouts {
    files: Vec<PathBuf>,
    opaque_dirs: Vec<PathBuf>,
}

/// Applies one uncompressed layer to `root`, updating `owners`.
pub fn apply(layer: impl Read, root: &Path, owners: &mut Owners) -> Result<(), LayerError> {
    let mut archive = tar::Archive::new(layer);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(is_root());
    archive.set_overwrite(true);
    let mut written = HashSet::new();
    let mut whiteouts = Whiteouts::default();
    for entry in archive.entries().map_err(LayerError::Read)? {
        let mut entry = entry.map_err(LayerError::Read)?;
        let raw = entry.path().map_err(LayerError::Read)?.into_owned();
        let Some(path) = clean(&raw)? else { continue };
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name == OPAQUE {
            whiteouts
                .opaque_dirs
                .push(path.parent().unwrap_or(Path::new("")).to_path_buf());
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            whiteouts.files.push(path.with_file_name(hidden));
            continue;
        }
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::Char | EntryType::Block) {
            // crun provides /dev; device nodes in images are never needed and cannot be
            // made without privileges.
            continue;
        }
        let dst = root.join(&path);
        check_no_symlink(root, parent_of(&path))?;
        // A later layer may replace a directory by a file or the other way round.
        if let Ok(old) = fs::symlink_metadata(&dst) {
            if !(old.is_dir() && kind == EntryType::Directory) {
                remove_any(&dst).map_err(|e| LayerError::Unpack(path.clone(), e))?;
            }
        }
        entry
            .unpack_in(root)
            .map_err(|e| LayerError::Unpack(path.clone(), e))?;
        let header = entry.header();
        let owner = (
            header.uid().map_err(LayerError::Read)?,
            header.gid().map_err(LayerError::Read)?,
        );
        owners.insert(path.clone(), owner);
        written.insert(path);
    }
    apply_whiteouts(root, &whiteouts, &written, owners)
}

fn apply_whiteouts(
    root: &Path,
    whiteouts: &Whiteouts,
    written: &HashSet<PathBuf>,
    owners: &mut Owners,
) -> Result<(), LayerError> {
    for dir in &whiteouts.opaque_dirs {
        // Its entries are listed and removed, so the directory must not be a symlink either.
        check_no_symlink(root, dir)?;
        clear_lower(root, dir, written).map_err(|e| LayerError::Unpack(dir.clone(), e))?;
        owners.retain(|p, _| !p.starts_with(dir) || p == dir || written.contains(p));
    }
    for hidden in &whiteouts.files {
        check_no_symlink(root, parent_of(hidden))?;
        remove_any(&root.join(hidden)).map_err(|e| LayerError::Unpack(hidden.clone(), e))?;
        owners.retain(|p, _| !p.starts_with(hidden));
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    /// A tar stream: (path, Some(content)) is a file, (path, None) a directory.
    pub fn tar_of(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_gnu();
            match content {
                Some(data) => {
                    h.set_entry_type(EntryType::Regular);
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                }
                None => {
                    h.set_entry_type(EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                }
            }
            h.set_uid(1000);
            h.set_gid(100);
            b.append_data(&mut h, path, content.unwrap_or_default())
                .unwrap();
        }
        b.into_inner().unwrap()
    }

    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(root.join(dir)).unwrap() {
                let rel = dir.join(e.unwrap().file_name());
                out.push(rel.display().to_string());
                if fs::symlink_metadata(root.join(&rel)).unwrap().is_dir() {
                    walk(root, &rel, out);
                }
            }
        }
        walk(root, Path::new(""), &mut out);
        out.sort();
        out
    }

    fn apply_all(layers: &[Vec<u8>]) -> (TempDir, Owners) {
        let dir = TempDir::new().unwrap();
        let mut owners = Owners::new();
        for layer in layers {
            apply(layer.as_slice(), dir.as_path(), &mut owners).unwrap();
        }
        (dir, owners)
    }

    /// A tar with one symlink entry.
    fn symlink_tar(path: &str, target: &Path) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_link(&mut h, path, target).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn removals_never_go_through_a_planted_symlink() {
        let outside = TempDir::new().unwrap();
        let victim = outside.as_path().join("victim");
        fs::create_dir(outside.as_path().join("dir")).unwrap();
        fs::write(outside.as_path().join("dir/inner"), b"x").unwrap();
        fs::write(&victim, b"host data").unwrap();
        let link = symlink_tar("a", outside.as_path());
        for upper in [
            tar_of(&[("a/.wh.victim", Some(b""))]),
            tar_of(&[("a/victim", Some(b"overwritten"))]),
            tar_of(&[("a/dir/.wh..wh..opq", Some(b""))]),
            tar_of(&[("a/.wh..wh..opq", Some(b""))]),
        ] {
            let root = TempDir::new().unwrap();
            let mut owners = Owners::new();
            apply(link.as_slice(), root.as_path(), &mut owners).unwrap();
            let err = apply(upper.as_slice(), root.as_path(), &mut owners).unwrap_err();
            assert!(err.to_string().contains("symbolic link"), "{err}");
            assert_eq!(fs::read(&victim).unwrap(), b"host data");
            assert!(outside.as_path().join("dir/inner").exists());
        }
    }

    #[test]
    fn whiteout_removes_a_lower_file_and_tree() {
        let lower = tar_of(&[
            ("etc/", None),
            ("etc/keep", Some(b"k")),
            ("etc/gone", Some(b"g")),
            ("var/", None),
            ("var/cache/", None),
            ("var/cache/x", Some(b"x")),
        ]);
        let upper = tar_of(&[("etc/.wh.gone", Some(b"")), ("var/.wh.cache", Some(b""))]);
        let (dir, owners) = apply_all(&[lower, upper]);
        assert_eq!(tree(dir.as_path()), ["etc", "etc/keep", "var"]);
        assert!(!owners.contains_key(Path::new("etc/gone")));
        assert!(!owners.contains_key(Path::new("var/cache/x")));
        assert_eq!(owners[Path::new("etc/keep")], (1000, 100));
    }

    #[test]
    fn opaque_dir_hides_lower_content_but_keeps_its_own_in_any_order() {
        let lower = tar_of(&[
            ("d/", None),
            ("d/old", Some(b"o")),
            ("d/sub/", None),
            ("d/sub/old", Some(b"o")),
            ("other", Some(b"x")),
        ]);
        // The marker comes after one of the layer's own entries and before another.
        let upper = tar_of(&[
            ("d/sub/new", Some(b"n")),
            ("d/.wh..wh..opq", Some(b"")),
            ("d/new", Some(b"n")),
        ]);
        let (dir, owners) = apply_all(&[lower, upper]);
        assert_eq!(
            tree(dir.as_path()),
            ["d", "d/new", "d/sub", "d/sub/new", "other"]
        );
        assert!(!owners.contains_key(Path::new("d/old")));
        assert!(owners.contains_key(Path::new("d/sub/new")));
    }

    #[test]
    fn later_layers_replace_files_and_change_types() {
        let lower = tar_of(&[("a", Some(b"one")), ("b/", None), ("b/x", Some(b"x"))]);
        let upper = tar_of(&[("a/", None), ("a/y", Some(b"y")), ("b", Some(b"two"))]);
        let (dir, _) = apply_all(&[lower, upper]);
        assert_eq!(tree(dir.as_path()), ["a", "a/y", "b"]);
        assert_eq!(fs::read(dir.as_path().join("b")).unwrap(), b"two");
    }

    #[test]
    fn refuses_paths_that_escape() {
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(EntryType::Regular);
        // set_path refuses "..", so write the name field directly.
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(&[b'x'; 512]);
        data.extend_from_slice(&[0; 1024]);
        let dir = TempDir::new().unwrap();
        let err = apply(data.as_slice(), dir.as_path(), &mut Owners::new()).unwrap_err();
        assert!(matches!(err, LayerError::BadEntry(_)), "{err}");
    }
}
