//! A host bundle → what its microVM needs: the directories to share (the root and the sources
//! of bind mounts) and the config.json crun runs in the guest, which is the bundle's own with
//! host-only parts rewritten or dropped. It is edited as JSON, not through typed structs, so
//! that fields rvmm does not know pass through to crun unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rvmm_agent::bundle::volume_source;
use rvmm_agent::protocol::{GuestNetwork, Volume};
use serde_json::{json, Value};

/// Guest RAM on top of the container's memory limit: the guest kernel, the agent and crun.
const HEADROOM_MIB: u64 = 192;
pub const DEFAULT_MEMORY_MIB: u64 = 512;
const MIN_MEMORY_MIB: u64 = 256;
const MAX_CPUS: u64 = 32;
/// Annotations that size the VM, over what linux.resources says.
pub const CPUS_ANNOTATION: &str = "rvmm.cpus";
pub const MEMORY_ANNOTATION: &str = "rvmm.memory_mib";
const ROOT_TAG: &str = "rvmm-root";
/// The resource controllers the guest kernel offers crun; others (hugetlb, rdma, blkio) are
/// the host's business.
const GUEST_RESOURCES: [&str; 4] = ["memory", "cpu", "pids", "devices"];

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a valid runtime config")]
    Json(PathBuf, #[source] serde_json::Error),
    #[error("ociVersion {0:?} is not supported (1.x is)")]
    Version(String),
    #[error("the config has no {0}")]
    Missing(&'static str),
    #[error("the root {0} is not a directory")]
    Root(PathBuf),
    #[error("bind mount source {0}")]
    Source(PathBuf, #[source] std::io::Error),
    #[error("{key}={value:?} is not a number")]
    Annotation { key: &'static str, value: String },
    #[error("a terminal (process.terminal) needs --console-socket")]
    NoConsoleSocket,
}

/// A host directory the VM gets over virtio-fs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub dir: PathBuf,
    pub tag: String,
    pub read_only: bool,
    /// Where the container first sees it.
    pub destination: String,
}

impl Share {
    /// rvmm's `--share` option.
    pub fn option(&self) -> String {
        let ro = if self.read_only { ",ro" } else { "" };
        format!("{},tag={}{ro}", self.dir.display(), self.tag)
    }
}

/// Everything the keeper needs to boot the VM and hand the agent its container.
#[derive(Debug)]
pub struct Plan {
    pub shares: Vec<Share>,
    pub volumes: Vec<Volume>,
    /// The guest's config.json.
    pub spec: String,
    pub cpus: u8,
    pub memory_mib: u64,
    /// The guest's eth0, when the VM joins the container's network (the keeper sets it).
    pub network: Option<GuestNetwork>,
    /// The `net.*` sysctls taken out of the config when the container uses the guest's
    /// network namespace, for the agent to set there.
    pub net_sysctls: Vec<(String, String)>,
}

/// Reads and checks `bundle/config.json` without acting on it.
pub fn load(bundle: &Path) -> Result<Value, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| SpecError::Read(path.clone(), e))?;
    let config: Value = serde_json::from_slice(&text).map_err(|e| SpecError::Json(path, e))?;
    let version = config["ociVersion"]
        .as_str()
        .ok_or(SpecError::Missing("ociVersion"))?;
    if !version.starts_with("1.") {
        return Err(SpecError::Version(version.into()));
    }
    config["process"]["args"]
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or(SpecError::Missing("process.args"))?;
    let root = root_dir(bundle, &config)?;
    if !root.is_dir() {
        return Err(SpecError::Root(root));
    }
    Ok(config)
}

fn root_dir(bundle: &Path, config: &Value) -> Result<PathBuf, SpecError> {
    let root = config["root"]["path"]
        .as_str()
        .ok_or(SpecError::Missing("root.path"))?;
    Ok(bundle.join(root))
}

/// Collects the host directories to share, one tag each however many mounts use it; a
/// directory is shared read-only only if every use of it is.
#[derive(Default)]
struct Shares {
    by_dir: BTreeMap<PathBuf, Share>,
}

impl Shares {
    /// The tag under which `dir` is shared; `destination` names it in the agent's messages.
    fn add(&mut self, dir: &Path, tag: Option<&str>, read_only: bool, destination: &str) -> String {
        let next = format!("rvmm-m{}", self.by_dir.len());
        let share = self
            .by_dir
            .entry(dir.to_path_buf())
            .or_insert_with(|| Share {
                dir: dir.to_path_buf(),
                tag: tag.map_or(next, str::to_string),
                read_only,
                destination: destination.to_string(),
            });
        share.read_only &= read_only;
        share.tag.clone()
    }

    fn into_plan(self) -> (Vec<Share>, Vec<Volume>) {
        let shares: Vec<Share> = self.by_dir.into_values().collect();
        let volumes = shares
            .iter()
            .map(|s| Volume {
                tag: s.tag.clone(),
                destination: s.destination.clone(),
                read_only: s.read_only,
            })
            .collect();
        (shares, volumes)
    }
}

fn is_bind(mount: &Value) -> bool {
    mount["type"] == "bind"
        || mount["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn has_option(mount: &Value, option: &str) -> bool {
    mount["options"]
        .as_array()
        .is_some_and(|o| o.iter().any(|x| x == option))
}

/// Points every bind mount at the guest's mount of its share; device nodes, which cannot
/// cross virtio-fs, are left out with a warning.
fn rewrite_mounts(config: &mut Value, shares: &mut Shares) -> Result<(), SpecError> {
    let Some(mounts) = config["mounts"].as_array_mut() else {
        return Ok(());
    };
    let mut kept = Vec::with_capacity(mounts.len());
    for mut mount in mounts.drain(..) {
        if !is_bind(&mount) {
            kept.push(mount);
            continue;
        }
        let source = PathBuf::from(mount["source"].as_str().unwrap_or_default());
        let meta = std::fs::metadata(&source).map_err(|e| SpecError::Source(source.clone(), e))?;
        let read_only = has_option(&mount, "ro");
        let destination = mount["destination"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let guest = if meta.is_dir() {
            volume_source(&shares.add(&source, None, read_only, &destination))
        } else if meta.is_file() {
            let parent = source.parent().unwrap_or(Path::new("/"));
            let tag = shares.add(parent, None, read_only, &destination);
            let name = source.file_name().unwrap_or_default().to_string_lossy();
            format!("{}/{name}", volume_source(&tag))
        } else {
            log::warn!(
                "bind mount of {} left out: only files and directories reach the VM",
                source.display()
            );
            continue;
        };
        mount["source"] = Value::String(guest);
        kept.push(mount);
    }
    *mounts = kept;
    Ok(())
}

/// The parts of the config that name host things the guest does not have.
fn drop_host_only(config: &mut Value, id: &str) {
    if let Some(map) = config.as_object_mut() {
        map.remove("hooks");
    }
    if let Some(process) = config["process"].as_object_mut() {
        process.remove("selinuxLabel");
        process.remove("apparmorProfile");
    }
    let Some(linux) = config["linux"].as_object_mut() else {
        return;
    };
    for key in ["mountLabel", "intelRdt"] {
        linux.remove(key);
    }
    // The guest makes fresh namespaces of each kind: host namespace paths mean nothing there.
    if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
        for ns in namespaces.iter_mut().filter_map(Value::as_object_mut) {
            ns.remove("path");
        }
    }
    linux.insert("cgroupsPath".into(), json!(format!("/rvmm/{id}")));
    if let Some(resources) = linux.get_mut("resources").and_then(Value::as_object_mut) {
        resources.retain(|k, _| GUEST_RESOURCES.contains(&k.as_str()));
    }
}

fn annotation(config: &Value, key: &'static str) -> Result<Option<u64>, SpecError> {
    match config["annotations"][key].as_str() {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| SpecError::Annotation {
            key,
            value: v.into(),
        }),
    }
}

/// vCPUs and MiB: the annotations, else the container's limits, else the defaults.
fn vm_size(config: &Value) -> Result<(u8, u64), SpecError> {
    let resources = &config["linux"]["resources"];
    let cpu = &resources["cpu"];
    let from_quota = match (cpu["quota"].as_i64(), cpu["period"].as_u64()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p)),
        _ => None,
    };
    let cpus = annotation(config, CPUS_ANNOTATION)?
        .or(from_quota)
        .unwrap_or(1)
        .clamp(1, MAX_CPUS) as u8;
    let from_limit = resources["memory"]["limit"]
        .as_i64()
        .filter(|&l| l > 0)
        .map(|l| (l as u64 >> 20) + HEADROOM_MIB);
    let memory = annotation(config, MEMORY_ANNOTATION)?
        .or(from_limit)
        .unwrap_or(DEFAULT_MEMORY_MIB)
        .max(MIN_MEMORY_MIB);
    Ok((cpus, memory))
}

/// How the container's VM meets its caller.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wiring {
    /// A console socket was given.
    pub console: bool,
    /// The VM joins the network of the bundle's namespace: the container then runs in the
    /// guest's own network namespace, whose eth0 is that network's interface.
    pub network: bool,
}

/// The bundle's network namespace, which the VM joins.
pub fn network_namespace(config: &Value) -> Option<PathBuf> {
    config["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|ns| ns["type"] == "network")?["path"]
        .as_str()
        .map(PathBuf::from)
}

/// The container runs in the guest's own network namespace: its network namespace goes, and
/// so do its `net.*` sysctls (returned), which crun takes only with a namespace of its own.
fn join_guest_network(config: &mut Value) -> Vec<(String, String)> {
    if let Some(namespaces) = config["linux"]["namespaces"].as_array_mut() {
        namespaces.retain(|ns| ns["type"] != "network");
    }
    let Some(sysctl) = config["linux"]["sysctl"].as_object_mut() else {
        return Vec::new();
    };
    let net: Vec<String> = sysctl
        .keys()
        .filter(|k| k.starts_with("net."))
        .cloned()
        .collect();
    net.into_iter()
        .filter_map(|k| {
            let v = sysctl.remove(&k)?;
            Some((k, v.as_str()?.to_string()))
        })
        .collect()
}

/// The VM and guest config for container `id` of `bundle`, whose config is `config`.
pub fn plan(bundle: &Path, id: &str, mut config: Value, wiring: Wiring) -> Result<Plan, SpecError> {
    let terminal = config["process"]["terminal"].as_bool().unwrap_or(false);
    if terminal && !wiring.console {
        return Err(SpecError::NoConsoleSocket);
    }
    let (cpus, memory_mib) = vm_size(&config)?;
    let mut shares = Shares::default();
    let root = root_dir(bundle, &config)?;
    // Shared writable even for root.readonly: crun in the guest makes the mount points first
    // and then the root read-only, as runc does on a host.
    let root_tag = shares.add(&root, Some(ROOT_TAG), false, "/");
    config["root"]["path"] = Value::String(volume_source(&root_tag));
    rewrite_mounts(&mut config, &mut shares)?;
    drop_host_only(&mut config, id);
    let net_sysctls = if wiring.network {
        join_guest_network(&mut config)
    } else {
        Vec::new()
    };
    let (shares, volumes) = shares.into_plan();
    Ok(Plan {
        shares,
        volumes,
        spec: config.to_string(),
        cpus,
        memory_mib,
        network: None,
        net_sysctls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    /// A bundle like podman's: a root, a file and a directory bind from its userdata, a
    /// device bind, host-only fields and a network namespace path.
    fn bundle(dir: &Path) -> Value {
        let userdata = dir.join("userdata");
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::create_dir_all(userdata.join("shm")).unwrap();
        std::fs::write(userdata.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        let ud = userdata.display();
        let config = json!({
            "ociVersion": "1.0.2-dev",
            "process": {"args": ["sh"], "terminal": false, "apparmorProfile": "x"},
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": format!("{ud}/hosts"),
                 "options": ["bind", "rprivate"]},
                {"destination": "/dev/shm", "type": "bind", "source": format!("{ud}/shm"),
                 "options": ["bind", "ro"]},
                {"destination": "/dev/null2", "type": "bind", "source": "/dev/null",
                 "options": ["bind"]},
            ],
            "hooks": {"prestart": [{"path": "/bin/true"}]},
            "annotations": {"rvmm.cpus": "2"},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}],
                "cgroupsPath": "machine.slice:libpod:abc",
                "resources": {"memory": {"limit": 268_435_456}, "hugepageLimits": []},
                "mountLabel": "system_u:object_r:container_file_t:s0",
            },
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        config
    }

    fn spec_of(plan: &Plan) -> Value {
        serde_json::from_str(&plan.spec).unwrap()
    }

    #[test]
    fn rewrites_a_podman_bundle_for_the_guest() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.as_path();
        bundle(dir);
        let plan = plan(dir, "c1", load(dir).unwrap(), Wiring::default()).unwrap();
        assert_eq!((plan.cpus, plan.memory_mib), (2, 256 + HEADROOM_MIB));
        let tags: Vec<(&str, bool)> = plan
            .shares
            .iter()
            .map(|s| (s.tag.as_str(), s.read_only))
            .collect();
        // The root (read-only in the guest's config, not in the share: crun must make mount
        // points there first), the userdata directory (for hosts, so writable) and shm.
        assert_eq!(
            tags,
            [("rvmm-root", false), ("rvmm-m1", false), ("rvmm-m2", true)]
        );
        assert_eq!(spec_of(&plan)["root"]["readonly"], true);
        assert_eq!(plan.shares[1].dir, dir.join("userdata"));
        assert_eq!(plan.volumes[1].destination, "/etc/hosts");
        let spec = spec_of(&plan);
        assert_eq!(spec["root"]["path"], "/run/rvmm-volumes/rvmm-root");
        let mounts = spec["mounts"].as_array().unwrap();
        let sources: Vec<&str> = mounts
            .iter()
            .map(|m| m["source"].as_str().unwrap())
            .collect();
        assert_eq!(
            sources,
            [
                "proc",
                "/run/rvmm-volumes/rvmm-m1/hosts",
                "/run/rvmm-volumes/rvmm-m2"
            ]
        );
        assert!(spec.get("hooks").is_none());
        assert!(spec["process"].get("apparmorProfile").is_none());
        assert!(spec["linux"].get("mountLabel").is_none());
        assert_eq!(spec["linux"]["cgroupsPath"], "/rvmm/c1");
        assert_eq!(spec["linux"]["namespaces"][1], json!({"type": "network"}));
        assert!(spec["linux"]["resources"].get("hugepageLimits").is_none());
        assert_eq!(spec["annotations"]["rvmm.cpus"], "2");
        let config = load(dir).unwrap();
        assert_eq!(
            network_namespace(&config).as_deref(),
            Some(Path::new("/run/netns/x"))
        );
        let wiring = Wiring {
            network: true,
            ..Wiring::default()
        };
        let mut config = config;
        config["linux"]["sysctl"] =
            json!({"net.ipv4.ping_group_range": "0 0", "kernel.msgmax": "8192"});
        let joined = plan_for(dir, config, wiring);
        assert_eq!(
            joined.net_sysctls,
            [("net.ipv4.ping_group_range".to_string(), "0 0".to_string())]
        );
        let joined = spec_of(&joined);
        assert_eq!(joined["linux"]["namespaces"], json!([{"type": "pid"}]));
        assert_eq!(joined["linux"]["sysctl"], json!({"kernel.msgmax": "8192"}));
    }

    fn plan_for(dir: &Path, config: Value, wiring: Wiring) -> Plan {
        plan(dir, "c1", config, wiring).unwrap()
    }

    #[test]
    fn refuses_bad_bundles() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.as_path();
        assert!(matches!(load(dir), Err(SpecError::Read(..))));
        let mut config = bundle(dir);
        let write = |c: &Value| std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        std::fs::write(dir.join("config.json"), "{").unwrap();
        assert!(matches!(load(dir), Err(SpecError::Json(..))));
        config["ociVersion"] = json!("2.0.0");
        write(&config);
        assert!(matches!(load(dir), Err(SpecError::Version(v)) if v == "2.0.0"));
        config["ociVersion"] = json!("1.0.0");
        config["root"]["path"] = json!("missing");
        write(&config);
        assert!(matches!(load(dir), Err(SpecError::Root(_))));
        config["root"]["path"] = json!("rootfs");
        config["process"]["args"] = json!([]);
        write(&config);
        assert!(matches!(load(dir), Err(SpecError::Missing("process.args"))));
        config["process"]["args"] = json!(["sh"]);
        config["process"]["terminal"] = json!(true);
        assert!(matches!(
            plan(dir, "c1", config.clone(), Wiring::default()),
            Err(SpecError::NoConsoleSocket)
        ));
        config["process"]["terminal"] = json!(false);
        config["annotations"]["rvmm.memory_mib"] = json!("lots");
        assert!(matches!(
            plan(dir, "c1", config.clone(), Wiring::default()),
            Err(SpecError::Annotation { .. })
        ));
        config["annotations"]["rvmm.memory_mib"] = json!("1024");
        config["mounts"][1]["source"] = json!("/nonexistent/hosts");
        assert!(matches!(
            plan(dir, "c1", config, Wiring::default()),
            Err(SpecError::Source(..))
        ));
    }
}
