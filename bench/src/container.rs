//! The container variant: OCI bundles run by crun, and the network namespace + veth pair that
//! connects a container to the host. Everything made here is undone on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::json;

use super::tools::{install_with_libs, ToolError, Tools};

/// Host and container ends of the veth pair's /30.
pub const VETH_HOST_IP: &str = "10.231.0.1";
pub const VETH_CONTAINER_IP: &str = "10.231.0.2";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("cannot write {0}")]
    Write(String, #[source] std::io::Error),
    #[error("{0} failed: {1}")]
    Command(String, String),
    #[error("cannot make a private mount namespace for crun")]
    MountNs(#[source] std::io::Error),
}

/// One read-only root filesystem shared by every bundle: the agent, fio and iperf3.
pub struct Rootfs {
    pub path: PathBuf,
}

impl Rootfs {
    pub fn create(work: &Path, tools: &Tools) -> Result<Rootfs, ContainerError> {
        let path = work.join("rootfs");
        for dir in ["bin", "proc", "dev", "data", "tmp"] {
            let d = path.join(dir);
            std::fs::create_dir_all(&d)
                .map_err(|e| ContainerError::Write(d.display().to_string(), e))?;
        }
        install_with_libs(&tools.agent, &path)?;
        for tool in [&tools.fio, &tools.iperf3].into_iter().flatten() {
            install_with_libs(tool, &path)?;
        }
        Ok(Rootfs { path })
    }
}

/// What one container runs.
pub struct Spec<'a> {
    pub args: &'a [&'a str],
    /// Host file → path inside the container, bound read-only.
    pub bind: Option<(&'a Path, &'a str)>,
    /// Join this named network namespace instead of a fresh empty one.
    pub netns: Option<&'a str>,
}

/// A bundle directory with its config.json; `crun delete -f` on drop in case it still runs.
pub struct Bundle {
    pub id: String,
    dir: PathBuf,
    crun: PathBuf,
}

impl Bundle {
    pub fn create(
        work: &Path,
        rootfs: &Rootfs,
        crun: &Path,
        spec: &Spec,
    ) -> Result<Bundle, ContainerError> {
        let id = format!(
            "rvmm-bench-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::SeqCst)
        );
        let dir = work.join(&id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ContainerError::Write(dir.display().to_string(), e))?;
        let config = config(rootfs, spec);
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string())
            .map_err(|e| ContainerError::Write(path.display().to_string(), e))?;
        Ok(Bundle {
            id,
            dir,
            crun: crun.to_path_buf(),
        })
    }

    /// `crun run` in the foreground: it ends when the container's process does.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.crun);
        cmd.arg("run").arg("--bundle").arg(&self.dir).arg(&self.id);
        cmd
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = Command::new(&self.crun)
            .args(["delete", "-f", &self.id])
            .output();
    }
}

fn config(rootfs: &Rootfs, spec: &Spec) -> serde_json::Value {
    let mut network = json!({ "type": "network" });
    if let Some(ns) = spec.netns {
        network["path"] = json!(format!("/var/run/netns/{ns}"));
    }
    let mut mounts = vec![
        json!({ "destination": "/proc", "type": "proc", "source": "proc" }),
        json!({ "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "mode=755", "size=1m"] }),
        json!({ "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["size=16m"] }),
    ];
    if let Some((host, inside)) = spec.bind {
        mounts.push(
            json!({ "destination": inside, "type": "bind", "source": host,
                            "options": ["bind", "ro"] }),
        );
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": spec.args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": { "path": rootfs.path, "readonly": true },
        "hostname": "rvmm-bench",
        "mounts": mounts,
        "linux": {
            "namespaces": [{ "type": "pid" }, network, { "type": "ipc" }, { "type": "uts" },
                           { "type": "mount" }]
        }
    })
}

/// crun 1.8 refuses a "hybrid" cgroup layout (v1 controllers plus a cgroup2 mount holding a
/// controller of its own, as on this kind of host). The bench then moves itself into a private
/// mount namespace without the cgroup2 mount: crun uses the v1 hierarchy, and the host's
/// mounts stay as they were.
pub fn hide_hybrid_cgroup2() -> Result<bool, ContainerError> {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let controllers =
        std::fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default();
    if controllers.trim().is_empty() {
        return Ok(false);
    }
    let last_os = std::io::Error::last_os_error;
    // SAFETY: unshare(2) with a constant flag; the bench is still single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(ContainerError::MountNs(last_os()));
    }
    let root = c"/";
    // SAFETY: a valid C string; no source, type or data: only changes propagation.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ContainerError::MountNs(last_os()));
    }
    let target = c"/sys/fs/cgroup/unified";
    // SAFETY: a valid C string naming a mount point of our private mount namespace.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(ContainerError::MountNs(last_os()));
    }
    Ok(true)
}

/// A network namespace for containers, joined to the host by a veth pair
/// (VETH_HOST_IP ↔ VETH_CONTAINER_IP); deleted on drop, which also removes the pair.
pub struct Netns {
    pub name: String,
    host_if: String,
}

impl Netns {
    pub fn create() -> Result<Netns, ContainerError> {
        let pid = std::process::id();
        let ns = Netns {
            name: format!("rvmm-bench-{pid}"),
            host_if: format!("rvbh{pid}"),
        };
        let peer = format!("rvbc{pid}");
        ip(&["netns", "add", &ns.name])?;
        let host_cidr = format!("{VETH_HOST_IP}/30");
        let peer_cidr = format!("{VETH_CONTAINER_IP}/30");
        let n = ns.name.as_str();
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", n])?;
        ip(&["addr", "add", &host_cidr, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&["-n", n, "addr", "add", &peer_cidr, "dev", &peer])?;
        ip(&["-n", n, "link", "set", &peer, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn ip(args: &[&str]) -> Result<(), ContainerError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| ContainerError::Command(format!("ip {}", args.join(" ")), e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(ContainerError::Command(
            format!("ip {}", args.join(" ")),
            err,
        ));
    }
    Ok(())
}
