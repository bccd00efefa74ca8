//! The OCI runtime bundle the agent hands to crun: `config.json` beside `rootfs/`, an overlay
//! whose lower layer is the read-only image disk and whose upper layer lives on tmpfs.
//!
//! Generation is a pure function so the host's tests can inspect exactly what a guest would
//! run.

use oci_spec::runtime::{
    LinuxNamespaceType, LinuxPidsBuilder, Mount, MountBuilder, Spec, UserBuilder,
};
use oci_spec::OciSpecError;

use crate::protocol::{RunRequest, Volume};
use crate::user::ResolvedUser;

/// At most this many processes per container (cgroup v2 pids.max), so a fork bomb cannot take
/// the agent down with it.
pub const PIDS_LIMIT: i64 = 4096;
/// The rootfs directory inside a bundle.
pub const ROOTFS_DIR: &str = "rootfs";
/// Where the guest mounts each volume's virtio-fs tag, to bind it into containers.
pub const VOLUMES_DIR: &str = "/run/rvmm-volumes";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("invalid runtime config")]
    Spec(#[source] OciSpecError),
    #[error("the command is empty (the image has no Entrypoint or Cmd and none was given)")]
    NoCommand,
    #[error("working directory {0:?} is not absolute")]
    RelativeCwd(String),
    #[error("volume destination {0:?} must be an absolute path other than /")]
    VolumeDestination(String),
    #[error("the container's config.json has no process")]
    NoProcess,
    #[error("the container's config.json is not valid JSON")]
    Json(#[source] serde_json::Error),
}

/// The process.json of `crun exec` for `argv` in a container whose bundle has `config_json`:
/// its process with other arguments, so the exec gets the container's environment, user,
/// working directory and capabilities.
pub fn exec_process(
    config_json: &str,
    argv: &[String],
    terminal: bool,
) -> Result<String, BundleError> {
    if argv.is_empty() {
        return Err(BundleError::NoCommand);
    }
    let config: serde_json::Value = serde_json::from_str(config_json).map_err(BundleError::Json)?;
    let mut process = config
        .get("process")
        .cloned()
        .ok_or(BundleError::NoProcess)?;
    let fields = process.as_object_mut().ok_or(BundleError::NoProcess)?;
    fields.insert("args".into(), argv.into());
    fields.insert("terminal".into(), terminal.into());
    fields.remove("consoleSize");
    Ok(process.to_string())
}

/// Where the guest mounts the virtio-fs `tag` of a volume.
pub fn volume_source(tag: &str) -> String {
    format!("{VOLUMES_DIR}/{tag}")
}

/// What one container needs besides the request itself.
pub struct BundleParams<'a> {
    pub request: &'a RunRequest,
    pub user: &'a ResolvedUser,
    pub hostname: &'a str,
    /// The container's cgroup, relative to the cgroup2 mount.
    pub cgroup: &'a str,
    /// pids.max; None where the pids controller is unavailable.
    pub pids_limit: Option<i64>,
}

/// The runtime config: the OCI defaults (pid, net, ipc, uts, mount and cgroup namespaces; the
/// default capabilities, masked and read-only paths, /proc, /dev, /sys mounts) with the
/// request's process, a writable root, a tmpfs /tmp, the request's volumes as bind mounts, and
/// a pids limit.
pub fn runtime_spec(p: &BundleParams) -> Result<Spec, BundleError> {
    let req = p.request;
    if req.argv.is_empty() {
        return Err(BundleError::NoCommand);
    }
    let cwd = if req.cwd.is_empty() { "/" } else { &req.cwd };
    if !cwd.starts_with('/') {
        return Err(BundleError::RelativeCwd(cwd.into()));
    }
    let mut spec = Spec::default();
    spec.set_hostname(Some(p.hostname.into()));

    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(req.argv.clone()));
    process.set_env(Some(req.env.clone()));
    process.set_cwd(cwd.into());
    // The agent gives crun a console socket for such a request.
    process.set_terminal(Some(req.terminal.is_some()));
    let user = UserBuilder::default()
        .uid(p.user.uid)
        .gid(p.user.gid)
        .additional_gids(p.user.additional_gids.clone())
        .build()
        .map_err(BundleError::Spec)?;
    process.set_user(user);
    spec.set_process(Some(process));

    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(ROOTFS_DIR.into());
    // The overlay's upper layer takes the writes; the image disk itself stays read-only.
    root.set_readonly(Some(false));
    spec.set_root(Some(root));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(tmp_mount()?);
    for volume in &req.volumes {
        mounts.push(volume_mount(volume)?);
    }
    spec.set_mounts(Some(mounts));

    let mut linux = spec.linux().clone().unwrap_or_default();
    if req.host_network {
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
        linux.set_namespaces(Some(namespaces));
    }
    linux.set_cgroups_path(Some(p.cgroup.into()));
    if let Some(limit) = p.pids_limit {
        let mut resources = linux.resources().clone().unwrap_or_default();
        let pids = LinuxPidsBuilder::default()
            .limit(limit)
            .build()
            .map_err(BundleError::Spec)?;
        resources.set_pids(Some(pids));
        linux.set_resources(Some(resources));
    }
    spec.set_linux(Some(linux));
    Ok(spec)
}

fn tmp_mount() -> Result<Mount, BundleError> {
    MountBuilder::default()
        .destination("/tmp")
        .typ("tmpfs")
        .source("tmpfs")
        .options(vec!["nosuid".into(), "nodev".into(), "mode=1777".into()])
        .build()
        .map_err(BundleError::Spec)
}

/// The guest's mount of the volume's tag, bound at its destination.
fn volume_mount(volume: &Volume) -> Result<Mount, BundleError> {
    let dest = &volume.destination;
    if !dest.starts_with('/') || dest.trim_end_matches('/').is_empty() {
        return Err(BundleError::VolumeDestination(dest.clone()));
    }
    let mut options = vec!["rbind".to_string(), "rprivate".into()];
    if volume.read_only {
        options.push("ro".into());
    }
    MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(volume_source(&volume.tag))
        .options(options)
        .build()
        .map_err(BundleError::Spec)
}

/// `config.json` as crun reads it.
pub fn config_json(spec: &Spec) -> Result<String, BundleError> {
    serde_json::to_string_pretty(spec).map_err(|e| BundleError::Spec(OciSpecError::SerDe(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RunRequest {
        RunRequest {
            argv: vec!["sh".into(), "-c".into(), "echo $FOO".into()],
            env: vec!["PATH=/bin".into(), "FOO=bar".into()],
            cwd: "/work".into(),
            user: "app".into(),
            stdin: false,
            host_network: false,
            volumes: Vec::new(),
            spec: None,
            ..RunRequest::default()
        }
    }

    #[test]
    fn exec_takes_the_containers_process_with_other_arguments() {
        let config = r#"{"process":{"args":["sh"],"env":["A=1"],"cwd":"/w","terminal":true,
            "consoleSize":{"height":1,"width":1},"user":{"uid":5,"gid":6}}}"#;
        let argv = vec!["cat".to_string(), "/f".to_string()];
        let process: serde_json::Value =
            serde_json::from_str(&exec_process(config, &argv, false).unwrap()).unwrap();
        assert_eq!(
            process,
            serde_json::json!({"args":["cat","/f"],"env":["A=1"],"cwd":"/w","terminal":false,
                "user":{"uid":5,"gid":6}})
        );
        assert!(matches!(
            exec_process(config, &[], false),
            Err(BundleError::NoCommand)
        ));
        assert!(matches!(
            exec_process("{}", &argv, false),
            Err(BundleError::NoProcess)
        ));
        assert!(matches!(
            exec_process("{", &argv, false),
            Err(BundleError::Json(_))
        ));
    }

    fn spec_for(req: &RunRequest) -> Result<serde_json::Value, BundleError> {
        let user = ResolvedUser {
            uid: 1000,
            gid: 100,
            additional_gids: vec![10],
        };
        let spec = runtime_spec(&BundleParams {
            request: req,
            user: &user,
            hostname: "rvmm",
            cgroup: "/rvmm/c1",
            pids_limit: Some(PIDS_LIMIT),
        })?;
        Ok(serde_json::from_str(&config_json(&spec)?).unwrap())
    }

    #[test]
    fn maps_the_request_onto_the_oci_defaults() {
        let v = spec_for(&request()).unwrap();
        let process = &v["process"];
        assert_eq!(
            process["args"],
            serde_json::json!(["sh", "-c", "echo $FOO"])
        );
        assert_eq!(process["env"], serde_json::json!(["PATH=/bin", "FOO=bar"]));
        assert_eq!(process["cwd"], "/work");
        assert_eq!(process["user"]["uid"], 1000);
        assert_eq!(process["user"]["gid"], 100);
        assert_eq!(process["user"]["additionalGids"], serde_json::json!([10]));
        assert_eq!(process["terminal"], false);
        let mut on_terminal = request();
        on_terminal.terminal = Some(crate::protocol::WindowSize { rows: 5, cols: 9 });
        assert_eq!(spec_for(&on_terminal).unwrap()["process"]["terminal"], true);
        let caps = serde_json::json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
        for set in ["bounding", "effective", "permitted"] {
            let mut got = process["capabilities"][set].as_array().unwrap().clone();
            got.sort_by_key(|c| c.as_str().unwrap().to_string());
            assert_eq!(serde_json::Value::Array(got), caps, "{set}");
        }
        assert_eq!(v["root"]["path"], "rootfs");
        assert_eq!(v["root"]["readonly"], false);
        assert_eq!(v["hostname"], "rvmm");
        let namespaces: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for ns in ["pid", "network", "ipc", "uts", "mount"] {
            assert!(namespaces.contains(&ns), "{ns} in {namespaces:?}");
        }
        assert_eq!(v["linux"]["cgroupsPath"], "/rvmm/c1");
        assert_eq!(v["linux"]["resources"]["pids"]["limit"], PIDS_LIMIT);
        let mounts: Vec<&str> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        for m in ["/proc", "/dev", "/sys", "/tmp"] {
            assert!(mounts.contains(&m), "{m} in {mounts:?}");
        }
    }

    #[test]
    fn host_network_drops_only_the_network_namespace() {
        let mut req = request();
        req.host_network = true;
        let v = spec_for(&req).unwrap();
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.iter().all(|n| n["type"] != "network"));
        assert!(ns.iter().any(|n| n["type"] == "pid"));
    }

    #[test]
    fn volumes_are_bind_mounts_of_their_tags() {
        let mut req = request();
        req.volumes = vec![
            Volume {
                tag: "v0".into(),
                destination: "/data".into(),
                read_only: false,
            },
            Volume {
                tag: "v1".into(),
                destination: "/etc/conf".into(),
                read_only: true,
            },
        ];
        let v = spec_for(&req).unwrap();
        let mounts = v["mounts"].as_array().unwrap();
        let find = |dest: &str| mounts.iter().find(|m| m["destination"] == dest).unwrap();
        assert_eq!(find("/data")["source"], "/run/rvmm-volumes/v0");
        assert_eq!(find("/data")["type"], "bind");
        assert_eq!(
            find("/data")["options"],
            serde_json::json!(["rbind", "rprivate"])
        );
        assert_eq!(
            find("/etc/conf")["options"],
            serde_json::json!(["rbind", "rprivate", "ro"])
        );
        for bad in ["data", "/", "//"] {
            req.volumes[0].destination = bad.into();
            assert!(
                matches!(spec_for(&req), Err(BundleError::VolumeDestination(d)) if d == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn refuses_an_empty_command_and_a_relative_cwd() {
        let mut req = request();
        req.argv.clear();
        assert!(matches!(spec_for(&req), Err(BundleError::NoCommand)));
        let mut req = request();
        req.cwd = "work".into();
        assert!(matches!(spec_for(&req), Err(BundleError::RelativeCwd(_))));
        req.cwd = String::new();
        assert_eq!(spec_for(&req).unwrap()["process"]["cwd"], "/");
    }
}
