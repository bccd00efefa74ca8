//! The device specs of the command line (`--disk`, `--net`, `--vsock`, `--fs`, `--share`):
//! each parsed by the one option parser, then validated into its config.

use std::fs;
use std::path::PathBuf;

use rvmm_devices::virtio::net::parse_mac;

use super::option_parser::OptionParser;
use super::ConfigError;

/// The virtio-vsock device and its Unix-socket host side.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// One virtio-net interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    /// None: see [`NetConfig::guest_mac`].
    pub mac: Option<[u8; 6]>,
}

impl NetConfig {
    /// The given MAC, or one derived from the TAP name: random-looking, locally administered,
    /// and the same on every start, so the guest's address survives restarts of the VM.
    pub fn guest_mac(&self) -> [u8; 6] {
        self.mac.unwrap_or_else(|| {
            // FNV-1a: a fixed, well-spread hash (std's hasher is randomly seeded per process).
            let hash = self.tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            let b = hash.to_le_bytes();
            // 0x52: unicast (bit 0 clear), locally administered (bit 1 set).
            [0x52, b[0], b[1], b[2], b[3], b[4]]
        })
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
            .value("mac")
            .parse(spec)
            .map_err(|e| bad(e.to_string()))?;
        let mac = opts
            .get("mac")
            .map(parse_mac)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        let tap = opts
            .get("tap")
            .ok_or_else(|| bad("tap=NAME is required".into()))?
            .to_string();
        Ok(NetConfig { tap, mac })
    }
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// What the guest reads as the disk's ID (GET_ID, /sys/block/vdX/serial).
    pub serial: Option<String>,
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
            .parse(spec)
            .map_err(|e| bad(&e.to_string()))?;
        let serial = opts.get("serial");
        if serial.is_some_and(|id| id.is_empty() || id.len() > MAX_DISK_SERIAL) {
            return Err(bad("serial must be 1 to 20 bytes"));
        }
        Ok(DiskConfig {
            path: PathBuf::from(opts.get("path").unwrap_or_default()),
            read_only: opts.is_set("ro"),
            serial: serial.map(str::to_string),
        })
    }
}

/// One virtio-fs device served by an external vhost-user backend (virtiofsd).
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
