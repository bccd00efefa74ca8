//! [`VmParams`] (the options as given) → validated [`VmConfig`]. Every bad input is refused
//! here with one line.

mod devices;
mod option_parser;

use devices::{parse_fs, parse_nets};
pub use devices::{
    user_net, DiskConfig, FsConfig, NetBackend, NetConfig, Protocol, PublishConfig, ShareConfig,
    VsockConfig,
};

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rvmm_firmware::cmdline::{KernelCmdline, KernelConsole, RootAccess};

use crate::jail::{self, JailConfig};
use crate::kernel_image;

/// Largest guest the layout supports without more memory slots (1 TiB).
const MAX_MEMORY_MIB: u64 = 1 << 20;
/// rvmm sizes its MP table and APIC ids for at most this many vCPUs.
const MAX_VCPUS: u8 = 32;
/// Room the kernel needs below its own load address plus a usable heap.
const MIN_MEMORY_MIB: u64 = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--jail-user {0}")]
    JailUser(String),
    #[error("--jail: {0} is in /, which the jail would have to keep: put the sockets in a directory of their own")]
    JailKeepsRoot(String),
    #[error("{0}")]
    Restore(String),
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Cpus(u32),
    #[error("--memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0}")]
    Memory(u64),
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("--disk {spec}: {reason}")]
    DiskSpec { spec: String, reason: String },
    #[error("--net {spec}: {reason}")]
    NetSpec { spec: String, reason: String },
    #[error("--net user is given twice (one user-mode network per VM)")]
    SecondUserNet,
    #[error("--publish {spec}: {reason}")]
    PublishSpec { spec: String, reason: String },
    #[error("--publish needs --net user")]
    PublishWithoutUserNet,
    #[error("--publish {0}: that host port is published twice")]
    DuplicatePublish(String),
    #[error("--vsock {spec}: {reason}")]
    VsockSpec { spec: String, reason: String },
    #[error("--fs {spec}: {reason}")]
    FsSpec { spec: String, reason: String },
    #[error("--share {spec}: {reason}")]
    ShareSpec { spec: String, reason: String },
    #[error("--fs/--share tag {0:?} is given twice")]
    DuplicateFsTag(String),
    #[error("{count} virtio devices asked for; the MMIO window and interrupt pins allow {max}")]
    TooManyDevices { count: usize, max: u32 },
    #[error("initrd {path} ({mib} MiB) does not fit in --memory {memory} MiB")]
    InitrdTooLarge { path: String, mib: u64, memory: u64 },
    #[error("disk {0} is given twice")]
    DuplicateDisk(String),
    #[error("--cmdline is too long ({0} bytes, at most {max})", max = rvmm_firmware::layout::CMDLINE_MAX_LEN - 1)]
    CmdlineTooLong(usize),
    #[error("--kernel is required")]
    NoKernel,
}

/// Which CPU features the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuTemplate {
    /// Everything KVM supports on this host.
    Host,
    /// A conservative x86-64 feature set (no XSAVE/AVX, POPCNT, RDRAND, SMEP/SMAP, PCID, …).
    Baseline,
}

/// Where the guest console lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConsoleKind {
    /// The COM1 8250 UART (ttyS0).
    Serial,
    /// A virtio-console port (hvc0); there is no UART.
    Virtio,
    /// No console device: guest output is discarded.
    None,
}

/// Whether rvmm's threads run under their seccomp filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Seccomp {
    /// Each thread may make only the system calls its kind of thread needs.
    On,
    /// No filters (for debugging; rvmm warns).
    Off,
}

impl ConsoleKind {
    /// The device the kernel's console is on, if any.
    pub fn kernel_console(self) -> Option<KernelConsole> {
        match self {
            ConsoleKind::Serial => Some(KernelConsole::Serial),
            ConsoleKind::Virtio => Some(KernelConsole::Virtio),
            ConsoleKind::None => None,
        }
    }
}

/// The VM's options as given (by the command line), before [`VmConfig::try_from`] checks them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmParams {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Replaces the default command line.
    pub cmdline: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub cpu_template: Option<CpuTemplate>,
    pub console: ConsoleKind,
    pub rootfs: Option<PathBuf>,
    /// `PATH[,ro][,serial=ID]` each.
    pub disks: Vec<String>,
    /// `tap=NAME[,mac=MAC]` or `user[,mac=MAC]` each.
    pub nets: Vec<String>,
    /// `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]` each, on the user-mode network.
    pub publish: Vec<String>,
    pub rng: bool,
    pub balloon: bool,
    /// Where the balloon writes the guest's memory statistics (implies `balloon`).
    pub balloon_stats: Option<PathBuf>,
    /// `cid=N,uds=PATH`.
    pub vsock: Option<String>,
    /// `tag=TAG,socket=PATH` each.
    pub fs: Vec<String>,
    /// `DIR,tag=TAG[,ro]` each.
    pub shares: Vec<String>,
    pub seccomp: Seccomp,
    pub acpi: bool,
    /// Where the control socket listens.
    pub api_socket: Option<PathBuf>,
    /// Enter the jail after set-up (`crate::jail`).
    pub jail: bool,
    /// `UID:GID` the jailed VMM becomes when started as root (implies `jail`).
    pub jail_user: Option<String>,
}

/// The virtio-balloon.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonConfig {
    /// The file the guest's memory statistics are written to, one JSON line every 2 s.
    pub stats: Option<PathBuf>,
}

/// A validated VM description: what [`crate::vmm::Vmm::build`] needs and nothing else.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: KernelCmdline,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// `None`: choose from the host (see [`crate::vstate::kvm::KvmHost`]).
    pub cpu_template: Option<CpuTemplate>,
    pub console: ConsoleKind,
    /// Virtio disks in guest order: the root filesystem first when there is one.
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// Host ports forwarded to the guest on the user-mode network.
    pub publish: Vec<PublishConfig>,
    pub rng: bool,
    /// A virtio-balloon that gives the guest's free pages back to the host.
    pub balloon: Option<BalloonConfig>,
    pub vsock: Option<VsockConfig>,
    /// virtio-fs devices on external backends; any of them (or of `shares`) makes guest RAM a
    /// shared memfd.
    pub fs: Vec<FsConfig>,
    /// virtio-fs devices on a virtiofsd of rvmm's own.
    pub shares: Vec<ShareConfig>,
    pub seccomp: Seccomp,
    /// Describe the machine with ACPI tables (and offer S5 power-off).
    pub acpi: bool,
    /// The control socket (`crate::api`).
    pub api_socket: Option<PathBuf>,
    /// The jail entered after set-up, if any.
    pub jail: Option<JailConfig>,
}

impl VmConfig {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Checks again what a restore may have changed: the disks, and the sockets a jail keeps.
    pub fn revalidate(&mut self) -> Result<(), ConfigError> {
        check_disks(&self.disks)?;
        if let Some(jail) = &mut self.jail {
            jail.keep = jail_keep(&mut self.vsock, &mut self.api_socket)?;
        }
        Ok(())
    }
}

impl TryFrom<VmParams> for VmConfig {
    type Error = ConfigError;

    fn try_from(cli: VmParams) -> Result<Self, ConfigError> {
        let kernel = cli.kernel.ok_or(ConfigError::NoKernel)?;
        let vcpus = match u8::try_from(cli.cpus) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => n,
            _ => return Err(ConfigError::Cpus(cli.cpus)),
        };
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&cli.memory_mib) {
            return Err(ConfigError::Memory(cli.memory_mib));
        }
        check_regular_file("kernel", &kernel)?;
        check_kernel_image(&kernel)?;
        if let Some(initrd) = &cli.initrd {
            check_regular_file("initrd", initrd)?;
            let size = fs::metadata(initrd).map_or(0, |m| m.len());
            if size >= cli.memory_mib << 20 {
                return Err(ConfigError::InitrdTooLarge {
                    path: initrd.display().to_string(),
                    mib: size.div_ceil(1 << 20),
                    memory: cli.memory_mib,
                });
            }
        }
        let mut cmdline = cli.cmdline.map_or_else(
            || KernelCmdline::with_defaults(cli.console.kernel_console()),
            KernelCmdline::verbatim,
        );
        let mut disks = Vec::new();
        if let Some(rootfs) = cli.rootfs {
            disks.push(DiskConfig {
                path: rootfs,
                read_only: false,
                serial: None,
                direct: false,
            });
            cmdline.root_vda(RootAccess::ReadWrite);
        }
        for spec in &cli.disks {
            disks.push(spec.parse()?);
        }
        check_disks(&disks)?;
        let (nets, publish) = parse_nets(&cli.nets, &cli.publish)?;
        // eth0 on the user-mode network gets its fixed address from the kernel itself, unless
        // the command line configures IP already.
        let has_ip = |cmdline: &KernelCmdline| {
            cmdline
                .as_str()
                .split_whitespace()
                .any(|p| p.starts_with("ip=") || p.starts_with("nfsaddrs="))
        };
        if nets.first().is_some_and(|n| n.backend == NetBackend::User) && !has_ip(&cmdline) {
            cmdline.push(user_net::KERNEL_IP_PARAM);
        }
        let mut vsock: Option<VsockConfig> = cli.vsock.as_deref().map(str::parse).transpose()?;
        let mut api_socket = cli.api_socket;
        let jail = jail_config(&cli.jail_user, cli.jail, &mut vsock, &mut api_socket)?;
        let (fs, shares) = parse_fs(&cli.fs, &cli.shares)?;
        let count = disks.len()
            + nets.len()
            + fs.len()
            + shares.len()
            + usize::from(cli.rng)
            + usize::from(cli.balloon || cli.balloon_stats.is_some())
            + usize::from(vsock.is_some())
            + usize::from(cli.console == ConsoleKind::Virtio);
        let max = rvmm_firmware::layout::VIRTIO_SLOT_COUNT;
        if count > max as usize {
            return Err(ConfigError::TooManyDevices { count, max });
        }
        let len = cmdline.as_str().len();
        if len >= rvmm_firmware::layout::CMDLINE_MAX_LEN {
            return Err(ConfigError::CmdlineTooLong(len));
        }
        Ok(VmConfig {
            kernel,
            initrd: cli.initrd,
            cmdline,
            vcpus,
            memory_mib: cli.memory_mib,
            cpu_template: cli.cpu_template,
            console: cli.console,
            disks,
            nets,
            publish,
            rng: cli.rng,
            balloon: (cli.balloon || cli.balloon_stats.is_some()).then_some(BalloonConfig {
                stats: cli.balloon_stats,
            }),
            vsock,
            fs,
            shares,
            seccomp: cli.seccomp,
            acpi: cli.acpi,
            api_socket,
            jail,
        })
    }
}

/// The jail keeps the directories of the sockets still used by path; those paths are made
/// absolute, since inside the jail the working directory is `/`.
fn jail_config(
    user: &Option<String>,
    jail: bool,
    vsock: &mut Option<VsockConfig>,
    api_socket: &mut Option<PathBuf>,
) -> Result<Option<JailConfig>, ConfigError> {
    if !jail && user.is_none() {
        return Ok(None);
    }
    let user = match user {
        Some(text) => text.parse().map_err(ConfigError::JailUser)?,
        None => jail::DEFAULT_USER,
    };
    let keep = jail_keep(vsock, api_socket)?;
    Ok(Some(JailConfig { keep, user }))
}

/// The socket directories a jail keeps; the socket paths are made absolute.
fn jail_keep(
    vsock: &mut Option<VsockConfig>,
    api_socket: &mut Option<PathBuf>,
) -> Result<Vec<PathBuf>, ConfigError> {
    let mut keep = Vec::new();
    let paths = vsock
        .iter_mut()
        .map(|v| &mut v.uds)
        .chain(api_socket.iter_mut());
    for path in paths {
        *path = jail::absolute(path);
        let dir = jail::socket_dir(path);
        if dir == Path::new("/") {
            return Err(ConfigError::JailKeepsRoot(path.display().to_string()));
        }
        keep.push(dir);
    }
    Ok(keep)
}

/// Every disk must be a non-empty regular file, and none may appear twice (under any name:
/// symbolic or hard links): two virtio disks on one image would corrupt it.
fn check_disks(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    let mut seen = Vec::new();
    for disk in disks {
        // An empty read-only disk is an empty slot, which a restore can fill (`rvmm run`'s
        // start-up snapshots); an empty writable one is a mistake.
        let empty_slot =
            disk.read_only && fs::metadata(&disk.path).is_ok_and(|m| m.is_file() && m.len() == 0);
        if !empty_slot {
            check_regular_file("disk", &disk.path)?;
        }
        let meta = fs::metadata(&disk.path).map_err(|e| ConfigError::File {
            what: "disk",
            path: disk.path.display().to_string(),
            reason: e.to_string(),
        })?;
        let id = (meta.dev(), meta.ino());
        if seen.contains(&id) {
            return Err(ConfigError::DuplicateDisk(disk.path.display().to_string()));
        }
        seen.push(id);
    }
    Ok(())
}

/// Refuses a kernel rvmm cannot boot (wrong format, machine or a truncated file).
fn check_kernel_image(path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File {
        what: "kernel",
        path: path.display().to_string(),
        reason,
    };
    let mut file = fs::File::open(path).map_err(|e| err(e.to_string()))?;
    kernel_image::inspect(&mut file).map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Refuses what can never be a kernel or initrd before any VM state exists.
fn check_regular_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let meta = fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(err("file is empty".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    /// The command line's defaults with `kernel`.
    fn params(kernel: &TempFile) -> VmParams {
        VmParams {
            kernel: Some(kernel.as_path().to_path_buf()),
            initrd: None,
            cmdline: None,
            cpus: 1,
            memory_mib: 128,
            cpu_template: None,
            console: ConsoleKind::Serial,
            rootfs: None,
            disks: Vec::new(),
            nets: Vec::new(),
            publish: Vec::new(),
            rng: false,
            balloon: false,
            balloon_stats: None,
            vsock: None,
            fs: Vec::new(),
            shares: Vec::new(),
            seccomp: Seccomp::On,
            acpi: true,
            api_socket: None,
            jail: false,
            jail_user: None,
        }
    }

    fn kernel_file() -> TempFile {
        let f = TempFile::new().unwrap();
        let mut elf = kernel_image::test_elf(16);
        elf.resize(0x1010, 0);
        std::fs::write(f.as_path(), elf).unwrap();
        f
    }

    #[test]
    fn defaults() {
        let k = kernel_file();
        let cfg = VmConfig::try_from(params(&k)).unwrap();
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.memory_mib, 128);
        assert_eq!(cfg.memory_bytes(), 128 << 20);
        assert!(cfg.cmdline.as_str().contains("console=ttyS0"));
        assert_eq!(cfg.cpu_template, None);
        assert_eq!(cfg.console, ConsoleKind::Serial);
        assert!(cfg.disks.is_empty());
        assert!(cfg.acpi);
        let no_kernel = VmParams {
            kernel: None,
            ..params(&k)
        };
        assert_eq!(VmConfig::try_from(no_kernel), Err(ConfigError::NoKernel));
    }

    #[test]
    fn default_cmdline_follows_the_console() {
        let k = kernel_file();
        let virtio = VmParams {
            console: ConsoleKind::Virtio,
            ..params(&k)
        };
        let cfg = VmConfig::try_from(virtio.clone()).unwrap();
        assert!(cfg.cmdline.as_str().starts_with("console=hvc0 reboot=k"));
        let given = VmParams {
            cmdline: Some("quiet".into()),
            ..virtio
        };
        let cfg = VmConfig::try_from(given).unwrap();
        assert_eq!(cfg.cmdline.as_str(), "quiet");
    }

    #[test]
    fn disk_specs() {
        let d: DiskConfig = "/img,ro,serial=abc".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img".into(),
                read_only: true,
                serial: Some("abc".into()),
                direct: false,
            }
        );
        let d: DiskConfig = "/img".parse().unwrap();
        assert!(!d.read_only && d.serial.is_none() && !d.direct);
        assert!("/img,direct=on".parse::<DiskConfig>().unwrap().direct);
        for bad in [
            "",
            ",ro",
            "/img,rw",
            "/img,serial=",
            "/img,serial=123456789012345678901",
            "/img,direct=yes",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn net_specs() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(n.backend, NetBackend::Tap("tap0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        let n: NetConfig = "tap=t1".parse().unwrap();
        assert_eq!(n.mac, None);
        let again: NetConfig = "tap=t1".parse().unwrap();
        let other: NetConfig = "tap=t2".parse().unwrap();
        assert_eq!(n.guest_mac(), again.guest_mac());
        assert_ne!(n.guest_mac(), other.guest_mac());
        assert_eq!(n.guest_mac()[0], 0x52);
        let u: NetConfig = "user".parse().unwrap();
        assert_eq!(u.backend, NetBackend::User);
        assert_eq!(u.guest_mac(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let u: NetConfig = "user,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(u.guest_mac(), [0x52, 0x54, 0, 0, 0, 1]);
        for bad in [
            "",
            "tap=",
            "mac=52:54:00:12:34:56",
            "tap=t,mac=zz",
            "tap=t,mtu=9000",
            "user=x",
            "user,tap=t",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn publish_specs() {
        let p: PublishConfig = "8080:80".parse().unwrap();
        let want = PublishConfig {
            host_ip: None,
            host_port: 8080,
            guest_port: 80,
            protocol: Protocol::Tcp,
        };
        assert_eq!(p, want);
        assert_eq!(p.host_addr().to_string(), "0.0.0.0:8080");
        let p: PublishConfig = "127.0.0.1:18082:80/udp".parse().unwrap();
        assert_eq!(p.host_addr().to_string(), "127.0.0.1:18082");
        assert_eq!((p.guest_port, p.protocol), (80, Protocol::Udp));
        let p: PublishConfig = "[::1]:8080:80/tcp".parse().unwrap();
        assert_eq!(p.host_addr().to_string(), "[::1]:8080");
        let msg = |s: &str| s.parse::<PublishConfig>().unwrap_err().to_string();
        assert_eq!(
            msg("80"),
            "--publish 80: expected [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]"
        );
        assert_eq!(msg("0:80"), "--publish 0:80: ports must be from 1 to 65535");
        assert_eq!(
            msg("1:65536"),
            "--publish 1:65536: ports must be from 1 to 65535"
        );
        assert_eq!(
            msg("1:2/sctp"),
            "--publish 1:2/sctp: the protocol must be tcp or udp"
        );
        assert_eq!(msg("host:1:2"), "--publish host:1:2: bad host address");
    }

    #[test]
    fn user_net_gets_its_address_and_its_ports() {
        let k = kernel_file();
        let with = |nets: &[&str], publish: &[&str], cmdline: Option<&str>| {
            VmConfig::try_from(VmParams {
                nets: nets.iter().map(|s| s.to_string()).collect(),
                publish: publish.iter().map(|s| s.to_string()).collect(),
                cmdline: cmdline.map(str::to_string),
                ..params(&k)
            })
        };
        let cfg = with(&["user"], &["127.0.0.1:18082:80", "18082:80/udp"], None).unwrap();
        assert!(cfg
            .cmdline
            .as_str()
            .ends_with(" ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"));
        assert_eq!(cfg.publish.len(), 2);
        // On a verbatim command line too, unless it configures IP itself.
        let cfg = with(&["user"], &[], Some("console=ttyS0")).unwrap();
        assert!(cfg.cmdline.as_str().contains(user_net::KERNEL_IP_PARAM));
        let cfg = with(&["user"], &[], Some("ip=dhcp")).unwrap();
        assert_eq!(cfg.cmdline.as_str(), "ip=dhcp");
        // Only when it is eth0.
        let cfg = with(&["tap=t0", "user"], &[], None).unwrap();
        assert!(!cfg.cmdline.as_str().contains("ip="));
        let err = |r: Result<VmConfig, ConfigError>| r.unwrap_err().to_string();
        assert_eq!(
            err(with(&["user", "user"], &[], None)),
            "--net user is given twice (one user-mode network per VM)"
        );
        assert_eq!(
            err(with(&["tap=t0"], &["80:80"], None)),
            "--publish needs --net user"
        );
        assert_eq!(
            err(with(&["user"], &["80:80", "127.0.0.1:80:81"], None)),
            "--publish 127.0.0.1:80:81: that host port is published twice"
        );
        assert!(with(&["user"], &["80:80", "80:80/udp"], None).is_ok());
    }

    #[test]
    fn vsock_specs() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.uds.to_str()), (3, Some("/tmp/v.sock")));
        for bad in [
            "",
            "cid=2,uds=/x",
            "cid=3",
            "uds=/x",
            "cid=x,uds=/x",
            "cid=3,uds=/x,y=1",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fs_specs() {
        let f: FsConfig = "tag=share,socket=/run/fs.sock".parse().unwrap();
        assert_eq!(
            (f.tag.as_str(), f.socket.to_str()),
            ("share", Some("/run/fs.sock"))
        );
        let tag36 = format!("tag={},socket=/s", "t".repeat(36));
        assert!(tag36.parse::<FsConfig>().is_ok());
        let msg = |s: &str| s.parse::<FsConfig>().unwrap_err().to_string();
        assert_eq!(
            msg("tag=,socket=/s"),
            "--fs tag=,socket=/s: tag must be 1 to 36 bytes"
        );
        let tag37 = format!("tag={},socket=/s", "t".repeat(37));
        assert!(msg(&tag37).ends_with(": tag must be 1 to 36 bytes"));
        assert_eq!(msg("socket=/s"), "--fs socket=/s: tag=TAG is required");
        assert_eq!(msg("tag=a"), "--fs tag=a: socket=PATH is required");
        assert_eq!(
            msg("tag=a,socket=/s,ro"),
            "--fs tag=a,socket=/s,ro: unknown option \"ro\""
        );
        let specs = ["tag=a,socket=/s".to_string(), "tag=a,socket=/t".to_string()];
        let dup = Err(ConfigError::DuplicateFsTag("a".into()));
        assert_eq!(parse_fs(&specs, &[]), dup);
        assert_eq!(parse_fs(&specs[..1], &["/,tag=a".to_string()]), dup);
        let (fs, shares) = parse_fs(&specs[..1], &["/,tag=b,ro".to_string()]).unwrap();
        assert_eq!((fs.len(), shares.len()), (1, 1));
        assert_eq!(
            shares[0],
            ShareConfig {
                dir: "/".into(),
                tag: "b".into(),
                read_only: true
            }
        );
        let msg = |s: &str| s.parse::<ShareConfig>().unwrap_err().to_string();
        assert_eq!(msg("/"), "--share /: tag=TAG is required");
        assert_eq!(msg(",tag=a"), "--share ,tag=a: no dir");
        assert_eq!(msg("/,tag="), "--share /,tag=: tag must be 1 to 36 bytes");
        assert_eq!(
            msg("/proc/self/exe,tag=a"),
            "--share /proc/self/exe,tag=a: not a directory"
        );
        assert!(msg("/nonexistent-dir,tag=a").contains("No such file"));
    }

    #[test]
    fn spec_errors_keep_their_messages() {
        let msg = |r: Result<DiskConfig, ConfigError>| r.unwrap_err().to_string();
        assert_eq!(msg(",ro".parse()), "--disk ,ro: no path");
        assert_eq!(msg("/i,rw".parse()), "--disk /i,rw: unknown option \"rw\"");
        assert_eq!(
            msg("/i,serial=".parse()),
            "--disk /i,serial=: serial must be 1 to 20 bytes"
        );
        let net = "tap=".parse::<NetConfig>().unwrap_err().to_string();
        assert_eq!(net, "--net tap=: unknown option \"tap=\"");
        let net = "mac=52:54:00:12:34:56".parse::<NetConfig>().unwrap_err();
        assert!(net.to_string().ends_with(": tap=NAME or user is required"));
        let vsock = |s: &str| s.parse::<VsockConfig>().unwrap_err().to_string();
        assert_eq!(vsock("cid=x,uds=/x"), "--vsock cid=x,uds=/x: bad cid \"x\"");
        assert_eq!(
            vsock("cid=2,uds=/x"),
            "--vsock cid=2,uds=/x: cid must be from 3 to 4294967294"
        );
        assert_eq!(vsock("uds=/x"), "--vsock uds=/x: cid=N is required");
        assert_eq!(vsock("cid=3"), "--vsock cid=3: uds=PATH is required");
    }

    #[test]
    fn rootfs_is_vda_and_sets_root() {
        let k = kernel_file();
        let root = kernel_file();
        let extra = kernel_file();
        let p = VmParams {
            rootfs: Some(root.as_path().to_path_buf()),
            disks: vec![format!("{},ro,serial=data1", extra.as_path().display())],
            ..params(&k)
        };
        let cfg = VmConfig::try_from(p).unwrap();
        assert!(cfg.cmdline.as_str().ends_with(" root=/dev/vda rw"));
        assert_eq!(cfg.disks.len(), 2);
        assert_eq!(cfg.disks[0].path, root.as_path());
        assert!(cfg.disks[1].read_only);
    }

    #[test]
    fn refuses_a_disk_given_twice() {
        let k = kernel_file();
        let root = kernel_file();
        let root = root.as_path().to_str().unwrap();
        let twice = VmParams {
            rootfs: Some(root.into()),
            disks: vec![root.into()],
            ..params(&k)
        };
        let err = VmConfig::try_from(twice);
        assert_eq!(err, Err(ConfigError::DuplicateDisk(root.to_string())));
        let dir = VmParams {
            disks: vec!["/tmp".into()],
            ..params(&k)
        };
        let err = VmConfig::try_from(dir);
        assert!(err.unwrap_err().to_string().ends_with("not a regular file"));
    }

    #[test]
    fn an_empty_disk_is_only_taken_read_only() {
        let k = kernel_file();
        let empty = TempFile::new().unwrap();
        let empty = empty.as_path().to_str().unwrap();
        let writable = VmParams {
            disks: vec![empty.into()],
            ..params(&k)
        };
        let err = VmConfig::try_from(writable).unwrap_err();
        assert!(err.to_string().ends_with("file is empty"), "{err}");
        let slot = VmParams {
            disks: vec![format!("{empty},ro")],
            ..params(&k)
        };
        assert!(VmConfig::try_from(slot).is_ok());
    }

    #[test]
    fn refuses_bad_counts() {
        let k = kernel_file();
        for cpus in [0, 33, 100_000] {
            let p = VmParams { cpus, ..params(&k) };
            assert_eq!(VmConfig::try_from(p), Err(ConfigError::Cpus(cpus)));
        }
        for memory_mib in [0, 99_999_999] {
            let p = VmParams {
                memory_mib,
                ..params(&k)
            };
            assert_eq!(VmConfig::try_from(p), Err(ConfigError::Memory(memory_mib)));
        }
    }

    #[test]
    fn refuses_bad_files() {
        let k = kernel_file();
        let with_kernel = |path: &str| VmParams {
            kernel: Some(path.into()),
            ..params(&k)
        };
        let missing = VmConfig::try_from(with_kernel("/nonexistent/vmlinux")).unwrap_err();
        assert!(missing
            .to_string()
            .starts_with("kernel /nonexistent/vmlinux:"));
        let dir = VmConfig::try_from(with_kernel("/tmp")).unwrap_err();
        assert!(dir.to_string().ends_with("not a regular file"));
        let empty = TempFile::new().unwrap();
        let err = VmConfig::try_from(with_kernel(empty.as_path().to_str().unwrap())).unwrap_err();
        assert!(err.to_string().ends_with("file is empty"));
        let initrd = VmParams {
            initrd: Some("/nonexistent".into()),
            ..params(&k)
        };
        let err = VmConfig::try_from(initrd).unwrap_err();
        assert!(err.to_string().starts_with("initrd /nonexistent:"));
    }

    #[test]
    fn refuses_long_cmdline() {
        let k = kernel_file();
        let long = VmParams {
            cmdline: Some("x".repeat(5000)),
            ..params(&k)
        };
        let err = VmConfig::try_from(long);
        assert_eq!(err, Err(ConfigError::CmdlineTooLong(5000)));
    }
}
