use std::path::Path;
use std::process::Command;

use vmm_sys_util::tempdir::TempDir;

use super::disk::{set_owners, DiskCache, DiskError};
use super::layer::LayerError;
use super::testimage::{self, TestImage};
use super::*;

fn busybox_image() -> Option<TestImage> {
    match TestImage::busybox() {
        Ok(image) => Some(image),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

fn check_root(root: &Path) {
    assert!(root.join("bin/busybox").is_file());
    assert!(root.join("bin/sh").symlink_metadata().unwrap().is_symlink());
    assert!(root.join(testimage::ADDED_BY_UPPER).is_file());
    assert!(!root.join(testimage::WHITED_OUT).exists());
    assert!(!root.join(testimage::HIDDEN_BY_OPAQUE).exists());
    assert!(root.join("etc/passwd").is_file());
}

fn open_and_unpack(path: &Path) -> Image {
    let scratch = TempDir::new().unwrap();
    let image = Image::open(path, scratch.as_path()).unwrap();
    let root = TempDir::new().unwrap();
    image.unpack(root.as_path(), &mut Owners::new()).unwrap();
    check_root(root.as_path());
    image
}

#[test]
fn reads_every_format_with_the_same_result() {
    let Some(img) = busybox_image() else { return };
    let dir = TempDir::new().unwrap();
    let layout = dir.as_path().join("layout");
    img.write_oci_layout(&layout).unwrap();
    let archive = dir.as_path().join("oci.tar");
    img.write_oci_archive(&archive).unwrap();
    let docker = dir.as_path().join("docker.tar");
    img.write_docker_save(&docker).unwrap();

    let from_layout = open_and_unpack(&layout);
    let from_archive = open_and_unpack(&archive);
    let from_docker = open_and_unpack(&docker);
    assert_eq!(from_layout.digest, from_archive.digest);
    assert!(from_docker.digest.starts_with("sha256:"));
    for image in [&from_layout, &from_docker] {
        assert_eq!(image.settings.cmd, ["echo", "default command"]);
        assert_eq!(image.settings.working_dir, "/root");
        assert!(image
            .settings
            .env
            .contains(&testimage::IMAGE_ENV.to_string()));
    }
}

#[test]
fn reads_a_rootfs_tarball() {
    let Some(img) = busybox_image() else { return };
    let dir = TempDir::new().unwrap();
    let tar = dir.as_path().join("rootfs.tar");
    img.write_rootfs_tar(&tar).unwrap();
    let scratch = TempDir::new().unwrap();
    let image = Image::open(&tar, scratch.as_path()).unwrap();
    assert_eq!(image.settings, Settings::default());
    let root = TempDir::new().unwrap();
    image.unpack(root.as_path(), &mut Owners::new()).unwrap();
    assert!(root.as_path().join(testimage::WHITED_OUT).is_file());
}

#[test]
fn refuses_unknown_formats() {
    let dir = TempDir::new().unwrap();
    let junk = dir.as_path().join("junk");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    for path in [junk.as_path(), dir.as_path()] {
        let err = Image::open(path, dir.as_path()).unwrap_err();
        assert!(matches!(err, ImageError::UnknownFormat(_)), "{err}");
    }
    let err = Image::open(&dir.as_path().join("missing"), dir.as_path()).unwrap_err();
    assert!(matches!(err, ImageError::Open(..)), "{err}");
}

/// The OCI layout's blobs, largest first (the gzipped busybox layer leads).
fn blobs_by_size(layout: &Path) -> Vec<std::path::PathBuf> {
    let mut blobs: Vec<_> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    blobs.sort_by_key(|p| std::cmp::Reverse(p.metadata().unwrap().len()));
    blobs
}

#[test]
fn refuses_missing_and_corrupt_blobs() {
    let Some(img) = busybox_image() else { return };
    let dir = TempDir::new().unwrap();
    let layout = dir.as_path().join("layout");
    img.write_oci_layout(&layout).unwrap();
    let big = blobs_by_size(&layout)[0].clone();
    let data = std::fs::read(&big).unwrap();

    let mut corrupt = data.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    std::fs::write(&big, &corrupt).unwrap();
    let image = Image::open(&layout, dir.as_path()).unwrap();
    let root = TempDir::new().unwrap();
    let err = image
        .unpack(root.as_path(), &mut Owners::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::DigestMismatch { .. }
                | ImageError::Layer(_)
                | ImageError::Apply(LayerError::Read(_))
        ),
        "{err}"
    );

    std::fs::remove_file(&big).unwrap();
    let err = image
        .unpack(root.as_path(), &mut Owners::new())
        .unwrap_err();
    assert!(matches!(err, ImageError::MissingBlob(_)), "{err}");

    // A corrupt manifest or config is caught when the image is opened.
    std::fs::write(&big, &data).unwrap();
    let index = std::fs::read_to_string(layout.join("index.json")).unwrap();
    let manifest_hex = index.split("sha256:").nth(1).unwrap()[..64].to_string();
    let manifest = layout.join("blobs/sha256").join(&manifest_hex);
    let mut bytes = std::fs::read(&manifest).unwrap();
    bytes.push(b' ');
    std::fs::write(&manifest, &bytes).unwrap();
    let err = Image::open(&layout, dir.as_path()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("digest mismatch for blob sha256:"),
        "{err}"
    );
    std::fs::remove_file(&manifest).unwrap();
    let err = Image::open(&layout, dir.as_path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("missing blob sha256:{manifest_hex}")
    );
}

#[test]
fn refuses_a_docker_layer_that_does_not_match_its_diff_id() {
    let Some(mut img) = busybox_image() else {
        return;
    };
    let dir = TempDir::new().unwrap();
    // The config keeps the original diff_ids while the layer changes.
    img.layers[1] = layer::tests::tar_of(&[("extra", Some(b"x"))]);
    let docker = dir.as_path().join("docker.tar");
    img.write_docker_save(&docker).unwrap();
    let image = Image::open(&docker, dir.as_path()).unwrap();
    let root = TempDir::new().unwrap();
    let err = image
        .unpack(root.as_path(), &mut Owners::new())
        .unwrap_err();
    assert!(
        err.to_string().starts_with("digest mismatch for layer "),
        "{err}"
    );
}

fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(disk)
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn builds_a_cached_ext4_disk_with_the_layers_applied() {
    let Some(img) = busybox_image() else { return };
    let dir = TempDir::new().unwrap();
    let layout = dir.as_path().join("layout");
    img.write_oci_layout(&layout).unwrap();
    let cache = DiskCache {
        dir: dir.as_path().join("cache"),
        max_bytes: disk::MAX_DISK_BYTES,
    };
    let image = Image::open(&layout, &cache.scratch()).unwrap();
    let disk = cache.disk_for(&image).unwrap();
    assert_eq!(disk, cache.path_for(&image.digest));
    assert!(disk
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .ends_with(".ext4"));
    let etc = debugfs(&disk, "ls -l /etc");
    assert!(etc.contains("passwd"), "{etc}");
    assert!(!etc.contains("removed-by-upper"), "{etc}");
    let opaque = debugfs(&disk, "ls /etc/opaque");
    assert!(
        opaque.contains("upper") && !opaque.contains("lower"),
        "{opaque}"
    );
    assert_eq!(debugfs(&disk, "cat /etc/opaque/upper"), "upper\n");
    let stat = debugfs(&disk, "stat /bin/busybox");
    assert!(stat.contains("User:     0   Group:     0"), "{stat}");
    // The scratch area is empty again and a second call reuses the disk.
    assert_eq!(std::fs::read_dir(cache.scratch()).unwrap().count(), 0);
    let before = disk.metadata().unwrap().modified().unwrap();
    assert_eq!(cache.disk_for(&image).unwrap(), disk);
    assert_eq!(disk.metadata().unwrap().modified().unwrap(), before);
}

#[test]
fn refuses_an_image_larger_than_the_disk_limit() {
    let Some(img) = busybox_image() else { return };
    let dir = TempDir::new().unwrap();
    let docker = dir.as_path().join("docker.tar");
    img.write_docker_save(&docker).unwrap();
    let cache = DiskCache {
        dir: dir.as_path().join("cache"),
        max_bytes: 8 << 20,
    };
    let image = Image::open(&docker, &cache.scratch()).unwrap();
    let err = cache.disk_for(&image).unwrap_err();
    assert!(
        matches!(err, DiskError::TooLarge { max_mib: 8, .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .starts_with("image is too large for the disk"));
    assert!(!cache.path_for(&image.digest).exists());
}

#[test]
fn set_owners_gives_paths_their_layer_owners() {
    let dir = TempDir::new().unwrap();
    let root = dir.as_path().join("root");
    std::fs::create_dir_all(root.join("home/app")).unwrap();
    std::fs::write(root.join("home/app/my file"), b"x").unwrap();
    let cache = DiskCache {
        dir: dir.as_path().join("cache"),
        max_bytes: disk::MAX_DISK_BYTES,
    };
    let disk = dir.as_path().join("d.ext4");
    cache.make_ext4(&root, &disk).unwrap();
    let mut owners = Owners::new();
    owners.insert("home/app".into(), (1000, 1001));
    owners.insert("home/app/my file".into(), (1000, 1001));
    set_owners(&disk, &owners).unwrap();
    for p in ["/home/app", "\"/home/app/my file\""] {
        let stat = debugfs(&disk, &format!("stat {p}"));
        assert!(stat.contains("User:  1000   Group:  1001"), "{p}: {stat}");
    }
}
