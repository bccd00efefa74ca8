//! What the `rvmm run` tests share: the container guest, the test image, run directories.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rvmm_container::image::testimage::TestImage;
use rvmm_container::vm::GuestFiles;
use vmm_sys_util::tempdir::TempDir;

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

/// What an `rvmm run` test needs: a real KVM (and passt where `passt`), the container guest,
/// and the test image as a docker save tar in a scratch directory; None where the test is
/// skipped.
pub struct RunEnv {
    pub guest: PathBuf,
    pub docker: PathBuf,
    pub dir: TempDir,
}

impl RunEnv {
    pub fn new(test: &str, passt: bool) -> Option<RunEnv> {
        if !super::linux_kvm_or_skip(test) || (passt && !super::passt_or_skip(test)) {
            return None;
        }
        let guest = container_guest(test)?;
        let dir = TempDir::new().unwrap();
        let (docker, _) = write_images(dir.as_path())?;
        Some(RunEnv { guest, docker, dir })
    }
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

/// A child process that is killed and reaped however the test ends.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `child` for at most `limit`; kills it and fails past that.
pub fn wait_within(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} took longer than {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cmd` to its end, bounded by `limit`: its status, stdout and stderr.
pub fn output_within(limit: Duration, mut cmd: Command) -> (Option<i32>, String, String) {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut from: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = from.read_to_end(&mut all);
            String::from_utf8_lossy(&all).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait_within(&mut child, limit);
    (status.code(), out.join().unwrap(), err.join().unwrap())
}
