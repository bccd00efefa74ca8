//! Image files already made into disks: one record per image file, kept beside the disks,
//! that gives the digest and settings it had at its stamp (device, inode, size, modification
//! and change times). A later run of the unchanged file takes its disk from the record
//! instead of reading, hashing and (for an archive) extracting the file again, as podman
//! finds an image in its store. Any change to the file changes its ctime, which no one can
//! set back, so a changed file is always opened and checked anew.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::disk::{DiskCache, DiskError};
use super::{Image, Settings};

const RECORDS: &str = "known";

/// What was learnt from an image file at one stamp.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    stamp: [i64; 6],
    digest: String,
    settings: Settings,
}

impl DiskCache {
    /// The disk and settings of the image at `path`: from this cache's record while the file
    /// is unchanged and its disk is still here, else opened, checked, built and recorded.
    pub fn image_disk(&self, path: &Path) -> Result<(PathBuf, Settings), DiskError> {
        let known = stamp(path).map(|s| (self.record_path(path), s));
        if let Some((file, stamp)) = &known {
            if let Some(rec) = read_record(file).filter(|r| r.stamp == *stamp) {
                let disk = self.path_for(&rec.digest);
                if disk.is_file() {
                    return Ok((disk, rec.settings));
                }
            }
        }
        let image = Image::open(path, &self.scratch())?;
        let disk = self.disk_for(&image)?;
        if let Some((file, stamp)) = known {
            let rec = Record {
                stamp,
                digest: image.digest.clone(),
                settings: image.settings.clone(),
            };
            // Only a saving: the next run opens the file again.
            if let Err(e) = write_record(&file, &rec) {
                log::debug!("cannot record image {}: {e}", path.display());
            }
        }
        Ok((disk, image.settings))
    }

    /// One record per image file, named by its absolute path.
    fn record_path(&self, image: &Path) -> PathBuf {
        let name = std::path::absolute(image).unwrap_or_else(|_| image.into());
        let hash = Sha256::digest(name.as_os_str().as_encoded_bytes());
        let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(RECORDS).join(format!("{hex}.json"))
    }
}

/// A regular file's stamp; None for a directory (an OCI layout's blobs change under it
/// without changing it) or what cannot be read.
fn stamp(path: &Path) -> Option<[i64; 6]> {
    let m = fs::metadata(path).ok().filter(|m| m.is_file())?;
    Some([
        m.dev() as i64,
        m.ino() as i64,
        m.size() as i64,
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        m.mode() as i64,
    ])
}

fn read_record(file: &Path) -> Option<Record> {
    serde_json::from_slice(&fs::read(file).ok()?).ok()
}

/// Written whole to a new file and renamed over the old, so a reader never sees half.
fn write_record(file: &Path, rec: &Record) -> io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let mut out = File::create(&tmp)?;
    out.write_all(&serde_json::to_vec(rec)?)?;
    drop(out);
    fs::rename(&tmp, file).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layer::tests::tar_of;
    use std::time::{Duration, SystemTime};
    use vmm_sys_util::tempdir::TempDir;

    /// A cache that already has the disk of the rootfs tar written at `tar`, so that no
    /// test needs mkfs.ext4.
    fn cache_with_disk(dir: &TempDir, tar: &Path) -> (DiskCache, PathBuf) {
        fs::write(tar, tar_of(&[("etc/", None), ("etc/hostname", Some(b"x"))])).unwrap();
        let cache = DiskCache {
            dir: dir.as_path().join("images"),
            ..DiskCache::user_default()
        };
        let image = Image::open(tar, &cache.scratch()).unwrap();
        let disk = cache.path_for(&image.digest);
        fs::create_dir_all(&cache.dir).unwrap();
        fs::write(&disk, b"disk").unwrap();
        (cache, disk)
    }

    /// Marks the file's record, so a result that carries the mark came from the record.
    fn mark_record(cache: &DiskCache, tar: &Path) {
        let file = cache.record_path(tar);
        let mut rec = read_record(&file).unwrap();
        rec.settings.user = "from-the-record".into();
        write_record(&file, &rec).unwrap();
    }

    #[test]
    fn an_unchanged_image_file_is_taken_from_its_record() {
        let dir = TempDir::new().unwrap();
        let tar = dir.as_path().join("image.tar");
        let (cache, disk) = cache_with_disk(&dir, &tar);
        let (first, settings) = cache.image_disk(&tar).unwrap();
        assert_eq!((&first, settings.user.as_str()), (&disk, ""));
        mark_record(&cache, &tar);
        let (again, settings) = cache.image_disk(&tar).unwrap();
        assert_eq!((&again, settings.user.as_str()), (&disk, "from-the-record"));
    }

    #[test]
    fn a_changed_or_diskless_image_file_is_opened_anew() {
        let dir = TempDir::new().unwrap();
        let tar = dir.as_path().join("image.tar");
        let (cache, disk) = cache_with_disk(&dir, &tar);
        cache.image_disk(&tar).unwrap();
        mark_record(&cache, &tar);
        let touched = SystemTime::now() - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&tar)
            .unwrap()
            .set_modified(touched)
            .unwrap();
        let (same, settings) = cache.image_disk(&tar).unwrap();
        assert_eq!((&same, settings.user.as_str()), (&disk, ""));

        mark_record(&cache, &tar);
        fs::remove_file(&disk).unwrap();
        // Its disk gone, the record is not used: the file is opened and a disk made anew
        // (mkfs.ext4 may be missing here; either way the record's mark does not come back).
        if let Ok((_, settings)) = cache.image_disk(&tar) {
            assert_eq!(settings.user, "");
        }
    }

    #[test]
    fn directories_have_no_record() {
        let dir = TempDir::new().unwrap();
        assert_eq!(stamp(dir.as_path()), None);
        assert!(stamp(&dir.as_path().join("missing")).is_none());
    }
}
