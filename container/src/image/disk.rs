//! An image's unpacked root as an ext4 disk image, made once per image digest with
//! `mkfs.ext4 -d` (no mounts, no privileges) and kept in the cache. A disk is built in a
//! scratch directory and renamed into place, so the cache never holds a half-written one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vmm_sys_util::tempdir::TempDir;

use super::layer::{is_root, Owners};
use super::{Image, ImageError};

/// The largest disk `rvmm run` makes for an image.
pub const MAX_DISK_BYTES: u64 = 16 << 30;
const BLOCK: u64 = 4096;
/// ext4 inode size used by mkfs.ext4's default profile.
const INODE_BYTES: u64 = 256;
/// Room for the superblock, group descriptors, bitmaps and directory growth.
const FIXED_MARGIN: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("image cache {0}")]
    Cache(PathBuf, #[source] io::Error),
    #[error("image is too large for the disk: its root needs {need_mib} MiB, the limit is {max_mib} MiB")]
    TooLarge { need_mib: u64, max_mib: u64 },
    #[error("{tool} is missing (install e2fsprogs)")]
    ToolMissing { tool: &'static str },
    #[error("{tool} failed: {msg}")]
    Tool { tool: &'static str, msg: String },
}

/// Built disks, by image digest.
pub struct DiskCache {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

impl DiskCache {
    /// `${XDG_CACHE_HOME:-$HOME/.cache}/rvmm/images`.
    pub fn user_default() -> DiskCache {
        DiskCache {
            dir: crate::cache::cache_base().join("images"),
            max_bytes: MAX_DISK_BYTES,
        }
    }

    /// Where archives are extracted and disks are built before they are renamed in.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Where the disk of the image with `digest` lives.
    pub fn path_for(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{}.ext4", digest.replace(':', "-")))
    }

    /// The image's disk, built first unless the cache has it.
    pub fn disk_for(&self, image: &Image) -> Result<PathBuf, DiskError> {
        let path = self.path_for(&image.digest);
        if path.is_file() {
            return Ok(path);
        }
        let scratch = self.scratch();
        let cache_err = |e: io::Error| DiskError::Cache(scratch.clone(), e);
        fs::create_dir_all(&scratch).map_err(cache_err)?;
        let work = TempDir::new_in(&scratch)
            .map_err(|e| cache_err(io::Error::from_raw_os_error(e.errno())))?;
        let root = work.as_path().join("root");
        fs::create_dir(&root).map_err(cache_err)?;
        let mut owners = Owners::new();
        image.unpack(&root, &mut owners)?;
        let tmp = work.as_path().join("disk.ext4");
        self.make_ext4(&root, &tmp)?;
        if !is_root() {
            set_owners(&tmp, &owners)?;
        }
        fs::rename(&tmp, &path).map_err(|e| DiskError::Cache(path.clone(), e))?;
        Ok(path)
    }

    /// An ext4 image of `root` at `out`, sized from the content.
    pub fn make_ext4(&self, root: &Path, out: &Path) -> Result<(), DiskError> {
        let usage = tree_usage(root).map_err(|e| DiskError::Cache(root.into(), e))?;
        let inodes = usage.inodes + usage.inodes / 10 + 64;
        let need = usage.bytes + usage.bytes / 10 + inodes * INODE_BYTES + FIXED_MARGIN;
        let size = need.div_ceil(1 << 20) << 20;
        if size > self.max_bytes {
            return Err(DiskError::TooLarge {
                need_mib: size >> 20,
                max_mib: self.max_bytes >> 20,
            });
        }
        // No journal and no reserved blocks: the guest mounts it read-only.
        run_tool(
            "mkfs.ext4",
            Command::new(tool_path("mkfs.ext4")?)
                .args(["-q", "-F", "-b", "4096", "-m", "0", "-O", "^has_journal"])
                .args(["-L", "rvmm-image", "-E", "root_owner=0:0", "-N"])
                .arg(inodes.to_string())
                .arg("-d")
                .arg(root)
                .arg(out)
                .arg(format!("{}k", size >> 10)),
            None,
        )
    }
}

/// Space and inode count a tree will take on ext4 with 4 KiB blocks.
#[derive(Debug, Default)]
struct Usage {
    bytes: u64,
    inodes: u64,
}

fn tree_usage(dir: &Path) -> io::Result<Usage> {
    let mut usage = Usage {
        bytes: BLOCK,
        inodes: 1,
    };
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        usage.inodes += 1;
        if meta.is_dir() {
            let sub = tree_usage(&entry.path())?;
            usage.bytes += sub.bytes;
            usage.inodes += sub.inodes - 1;
        } else {
            // Short symlink targets live in the inode; everything else takes whole blocks.
            usage.bytes += meta.len().div_ceil(BLOCK) * BLOCK;
        }
    }
    Ok(usage)
}

/// mkfs.ext4 -d copies the unpacking user's owners; as non-root, give every path the owner
/// its layer recorded.
pub fn set_owners(disk: &Path, owners: &Owners) -> Result<(), DiskError> {
    let mut script = String::new();
    for (path, (uid, gid)) in owners {
        let p = path.display().to_string().replace('"', "\\\"");
        script.push_str(&format!("sif \"/{p}\" uid {uid}\nsif \"/{p}\" gid {gid}\n"));
    }
    run_tool(
        "debugfs",
        Command::new(tool_path("debugfs")?)
            .args(["-w", "-f", "-"])
            .arg(disk),
        Some(script.as_bytes()),
    )
}

/// e2fsprogs lives in /usr/sbin, which a normal user's PATH may lack.
fn tool_path(tool: &'static str) -> Result<PathBuf, DiskError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or(DiskError::ToolMissing { tool })
}

fn run_tool(tool: &'static str, cmd: &mut Command, input: Option<&[u8]>) -> Result<(), DiskError> {
    let failed = |msg: String| DiskError::Tool { tool, msg };
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(data).map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    Err(failed(format!("{} ({})", last.trim(), out.status)))
}
