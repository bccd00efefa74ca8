//! The device specs of the command line (`--disk`, `--net`, `--vsock`, `--fs`, `--share`):
//! each parsed by the one option parser, then validated into its config; and `--publish`.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use rvmm_devices::virtio::net::parse_mac;

use super::option_parser::OptionParser;
use super::ConfigError;

/// The virtio-vsock device and its Unix-socket host side.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
}

/// CIDs 0-2 are reserved (hypervisor, local, host); the device's field is 32 bits on the wire.
const VSOCK_CIDS: std::ops::Range<u64> = 3..u32::MAX as u64;

impl std::str::FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::VsockSpec {
            spec: spec.to_string(),
            reason,
        };
        let opts = OptionParser::new()
            .value("cid")
            .non_empty("uds")
            .parse(spec)
            .map_err(|e| bad(e.to_string()))?;
        let cid = opts.convert::<u64>("cid").map_err(|e| bad(e.to_string()))?;
        if cid.is_some_and(|n| !VSOCK_CIDS.contains(&n)) {
            return Err(bad(format!("cid must be from 3 to {}", VSOCK_CIDS.end - 1)));
        }
        let uds = opts.get("uds").map(PathBuf::from);
        Ok(VsockConfig {
            cid: cid.ok_or_else(|| bad("cid=N is required".into()))?,
            uds: uds.ok_or_else(|| bad("uds=PATH is required".into()))?,
        })
    }
}

/// Where a virtio-net interface's frames go.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetBackend {
    /// An existing TAP device.
    Tap(String),
    /// User-mode networking: a passt that rvmm starts for the VM (see [`crate::passt`]).
    User,
}

/// One virtio-net interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub backend: NetBackend,
    /// None: see [`NetConfig::guest_mac`].
    pub mac: Option<[u8; 6]>,
}

/// The guest's MAC address on the user-mode network when none is given: QEMU's default.
const USER_NET_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

impl NetConfig {
    /// The given MAC, or one derived from the TAP name: random-looking, locally administered,
    /// and the same on every start, so the guest's address survives restarts of the VM. On the
    /// user-mode network (one per VM), QEMU's 52:54:00:12:34:56.
    pub fn guest_mac(&self) -> [u8; 6] {
        let tap = match (&self.mac, &self.backend) {
            (Some(mac), _) => return *mac,
            (None, NetBackend::User) => return USER_NET_MAC,
            (None, NetBackend::Tap(tap)) => tap,
        };
        // FNV-1a: a fixed, well-spread hash (std's hasher is randomly seeded per process).
        let hash = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let b = hash.to_le_bytes();
        // 0x52: unicast (bit 0 clear), locally administered (bit 1 set).
        [0x52, b[0], b[1], b[2], b[3], b[4]]
    }
}

impl std::str::FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::NetSpec {
            spec: spec.to_string(),
            reason,
        };
        let opts = OptionParser::new()
            .non_empty("tap")
            .flag("user")
            .value("mac")
            .parse(spec)
            .map_err(|e| bad(e.to_string()))?;
        let mac = opts
            .get("mac")
            .map(parse_mac)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        let backend = match (opts.get("tap"), opts.is_set("user")) {
            (Some(tap), false) => NetBackend::Tap(tap.to_string()),
            (None, true) => NetBackend::User,
            (Some(_), true) => return Err(bad("give either tap=NAME or user".into())),
            (None, false) => return Err(bad("tap=NAME or user is required".into())),
        };
        Ok(NetConfig { backend, mac })
    }
}

/// The fixed addressing of the user-mode network, as QEMU's slirp has it: the guest is
/// 10.0.2.15/24, and the gateway 10.0.2.2, which is also the way to the host's loopback.
pub mod user_net {
    use std::net::Ipv4Addr;

    /// The guest's address.
    pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    /// The gateway: passt, and through it the host's 127.0.0.1.
    pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    /// The network's prefix length.
    pub const PREFIX_LEN: u8 = 24;
    /// What the kernel's IP autoconfiguration (CONFIG_IP_PNP) needs to give eth0 that address
    /// and route by itself, before init runs.
    pub const KERNEL_IP_PARAM: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off";
}

/// A transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// `--publish [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]`: a host port forwarded by passt to a
/// guest port on the user-mode network.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishConfig {
    /// The host address to listen on; None: every address.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: Protocol,
}

impl PublishConfig {
    /// The host socket address passt listens on.
    pub fn host_addr(&self) -> SocketAddr {
        let ip = self.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        SocketAddr::new(ip, self.host_port)
    }
}

impl std::str::FromStr for PublishConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::PublishSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (ports, protocol) = match spec.rsplit_once('/') {
            None => (spec, Protocol::Tcp),
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some(_) => return Err(bad("the protocol must be tcp or udp")),
        };
        let port = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad("ports must be from 1 to 65535")),
            Ok(n) => Ok(n),
        };
        let (host, guest_port) = ports
            .rsplit_once(':')
            .ok_or_else(|| bad("expected [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]"))?;
        let guest_port = port(guest_port)?;
        let (host_ip, host_port) = match host.rsplit_once(':') {
            None => (None, port(host)?),
            Some((ip, host_port)) => {
                // An IPv6 address is written in brackets: [::1]:8080:80.
                let ip = ip
                    .strip_prefix('[')
                    .and_then(|i| i.strip_suffix(']'))
                    .unwrap_or(ip);
                let ip = ip.parse().map_err(|_| bad("bad host address"))?;
                (Some(ip), port(host_port)?)
            }
        };
        Ok(PublishConfig {
            host_ip,
            host_port,
            guest_port,
            protocol,
        })
    }
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// What the guest reads as the disk's ID (GET_ID, /sys/block/vdX/serial).
    pub serial: Option<String>,
    /// O_DIRECT: the host's page cache is bypassed.
    pub direct: bool,
}

/// The longest serial virtio-blk can report (VIRTIO_BLK_ID_BYTES).
const MAX_DISK_SERIAL: usize = 20;

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::DiskSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let opts = OptionParser::new()
            .positional("path")
            .flag("ro")
            .value("serial")
            .value("direct")
            .parse(spec)
            .map_err(|e| bad(&e.to_string()))?;
        let serial = opts.get("serial");
        if serial.is_some_and(|id| id.is_empty() || id.len() > MAX_DISK_SERIAL) {
            return Err(bad("serial must be 1 to 20 bytes"));
        }
        let direct = match opts.get("direct") {
            None | Some("off") => false,
            Some("on") => true,
            Some(_) => return Err(bad("direct must be on or off")),
        };
        Ok(DiskConfig {
            path: PathBuf::from(opts.get("path").unwrap_or_default()),
            read_only: opts.is_set("ro"),
            serial: serial.map(str::to_string),
            direct,
        })
    }
}

/// One virtio-fs device served by an external vhost-user backend (virtiofsd).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsConfig {
    /// What the guest mounts: `mount -t virtiofs TAG DIR`.
    pub tag: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
}

impl std::str::FromStr for FsConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::FsSpec {
            spec: spec.to_string(),
            reason,
        };
        let opts = OptionParser::new()
            .value("tag")
            .non_empty("socket")
            .parse(spec)
            .map_err(|e| bad(e.to_string()))?;
        let tag = required_tag(opts.get("tag")).map_err(bad)?;
        let socket = opts
            .get("socket")
            .ok_or_else(|| bad("socket=PATH is required".into()))?;
        Ok(FsConfig {
            tag: tag.to_string(),
            socket: PathBuf::from(socket),
        })
    }
}

/// A host directory shared through a virtiofsd that rvmm starts and stops with the VM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShareConfig {
    pub dir: PathBuf,
    pub tag: String,
    /// Enforced on the host: virtiofsd sees a read-only bind mount.
    pub read_only: bool,
}

impl std::str::FromStr for ShareConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::ShareSpec {
            spec: spec.to_string(),
            reason,
        };
        let opts = OptionParser::new()
            .positional("dir")
            .value("tag")
            .flag("ro")
            .parse(spec)
            .map_err(|e| bad(e.to_string()))?;
        let tag = required_tag(opts.get("tag")).map_err(bad)?;
        let dir = PathBuf::from(opts.get("dir").unwrap_or_default());
        match fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(bad("not a directory".into())),
            Err(e) => return Err(bad(e.to_string())),
        }
        Ok(ShareConfig {
            dir,
            tag: tag.to_string(),
            read_only: opts.is_set("ro"),
        })
    }
}

/// The `tag=` of a virtio-fs spec: required, and as long as the device's config space holds.
fn required_tag(tag: Option<&str>) -> Result<&str, String> {
    let tag = tag.ok_or_else(|| "tag=TAG is required".to_string())?;
    let max = rvmm_devices::virtio::fs::MAX_TAG_LEN;
    if tag.is_empty() || tag.len() > max {
        return Err(format!("tag must be 1 to {max} bytes"));
    }
    Ok(tag)
}

/// Parses every `--fs` and `--share`; the guest tells the devices apart by tag, so each must
/// be unique across both.
pub(super) fn parse_fs(
    fs_specs: &[String],
    share_specs: &[String],
) -> Result<(Vec<FsConfig>, Vec<ShareConfig>), ConfigError> {
    let fs = fs_specs
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<FsConfig>, _>>()?;
    let shares = share_specs
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<ShareConfig>, _>>()?;
    let mut tags: Vec<&str> = Vec::new();
    for tag in fs
        .iter()
        .map(|f| &f.tag)
        .chain(shares.iter().map(|s| &s.tag))
    {
        if tags.contains(&tag.as_str()) {
            return Err(ConfigError::DuplicateFsTag(tag.clone()));
        }
        tags.push(tag);
    }
    Ok((fs, shares))
}

/// Parses every `--net` and `--publish`: one user-mode network at most, ports published only
/// on it, and each host port (per protocol) once.
pub(super) fn parse_nets(
    net_specs: &[String],
    publish_specs: &[String],
) -> Result<(Vec<NetConfig>, Vec<PublishConfig>), ConfigError> {
    let nets = net_specs
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<NetConfig>, _>>()?;
    let users = nets
        .iter()
        .filter(|n| n.backend == NetBackend::User)
        .count();
    if users > 1 {
        return Err(ConfigError::SecondUserNet);
    }
    let publish = publish_specs
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<PublishConfig>, _>>()?;
    if users == 0 && !publish.is_empty() {
        return Err(ConfigError::PublishWithoutUserNet);
    }
    for (i, p) in publish.iter().enumerate() {
        let same = |q: &&PublishConfig| q.host_port == p.host_port && q.protocol == p.protocol;
        if publish[..i].iter().any(|q| same(&q)) {
            return Err(ConfigError::DuplicatePublish(publish_specs[i].clone()));
        }
    }
    Ok((nets, publish))
}
