//! What the `rvmm run` tests share: the container guest, the test image, run directories.

use std::path::{Path, PathBuf};

use rvmm_container::image::testimage::TestImage;
use rvmm_container::vm::GuestFiles;

/// The container guest, or a skip (a failure under RVMM_REQUIRE_KVM=1).
pub fn container_guest(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("RVMM_CONTAINER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| rvmm_container::cache::cache_base().join("container-guest"));
    if GuestFiles::find(Some(&dir)).is_ok() {
        return Some(dir);
    }
    if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!(
            "{test}: no container guest in {} (run resources/build-container-guest.sh)",
            dir.display()
        );
    }
    eprintln!("SKIPPED {test}: no container guest in {}", dir.display());
    None
}

/// The test image as a docker save tar and an OCI layout, in `dir`.
pub fn write_images(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let image = match TestImage::busybox() {
        Ok(image) => image,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return None;
        }
    };
    let (docker, oci) = (dir.join("docker.tar"), dir.join("oci"));
    image.write_docker_save(&docker).unwrap();
    image.write_oci_layout(&oci).unwrap();
    Some((docker, oci))
}

/// `rvmm run`'s run directories now in /tmp.
pub fn run_dirs() -> Vec<PathBuf> {
    std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().starts_with("/tmp/rvmm-run-"))
        .collect()
}
