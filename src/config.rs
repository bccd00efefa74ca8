//! Command line → validated [`VmConfig`]. Every bad input is refused here with one line.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use rvmm_devices::virtio::net::parse_mac;

use crate::kernel_image;

/// Largest guest the layout supports without more memory slots (1 TiB).
const MAX_MEMORY_MIB: u64 = 1 << 20;
/// rvmm sizes its MP table and APIC ids for at most this many vCPUs.
const MAX_VCPUS: u8 = 32;
/// Room the kernel needs below its own load address plus a usable heap.
const MIN_MEMORY_MIB: u64 = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
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
    #[error("--vsock {spec}: {reason}")]
    VsockSpec { spec: String, reason: String },
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CpuTemplate {
    /// Everything KVM supports on this host.
    Host,
    /// A conservative x86-64 feature set (no XSAVE/AVX, POPCNT, RDRAND, SMEP/SMAP, PCID, …).
    Baseline,
}

/// Where the guest console lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConsoleKind {
    /// The COM1 8250 UART (ttyS0).
    Serial,
    /// A virtio-console port (hvc0); there is no UART.
    Virtio,
    /// No console device: guest output is discarded.
    None,
}

/// Whether rvmm's threads run under their seccomp filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Seccomp {
    /// Each thread may make only the system calls its kind of thread needs.
    On,
    /// No filters (for debugging; rvmm warns).
    Off,
}

/// rvmm — boot a Linux guest on KVM.
#[derive(Debug, Parser)]
#[command(
    name = "rvmm",
    version,
    about,
    long_about = None,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// What rvmm does besides booting the VM described by the top-level options.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a container inside a fresh microVM.
    Run(crate::container::RunArgs),
    /// Compare a microVM's costs with a container's and a plain process's.
    Bench(crate::bench::BenchArgs),
}

/// The VM to boot when no subcommand is given.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH", required = true)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk loaded next to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default, which names the console device).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    pub memory: u64,
    /// CPU features shown to the guest; defaults to `baseline` on an emulating (nested) KVM,
    /// `host` otherwise.
    #[arg(long, value_enum)]
    pub cpu_template: Option<CpuTemplate>,
    /// Guest console device.
    #[arg(long, value_enum, default_value = "serial")]
    pub console: ConsoleKind,
    /// Root filesystem image: becomes /dev/vda, and `root=/dev/vda rw` is added to the
    /// command line.
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// An extra virtio disk (vdb, vdc, … in order): PATH[,ro][,serial=ID]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<String>,
    /// A virtio-net interface on an existing TAP device: tap=NAME[,mac=MAC]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,
    /// A virtio-rng device fed from the host's getrandom().
    #[arg(long)]
    pub rng: bool,
    /// A virtio-vsock device, cid=N,uds=PATH: host programs reach guest port P by connecting to
    /// the Unix socket PATH and writing "CONNECT P\n"; the guest reaches host port P at PATH_P.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,
    /// Per-thread seccomp filters; `off` is for debugging only.
    #[arg(long, value_enum, default_value = "on")]
    pub seccomp: Seccomp,
    /// No ACPI tables: the guest finds its CPUs through the MP table and the virtio devices
    /// through `virtio_mmio.device=` entries on the command line, and cannot power itself off.
    #[arg(long)]
    pub no_acpi: bool,
}

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
        let (mut cid, mut uds) = (None, None);
        for opt in spec.split(',') {
            match opt.split_once('=') {
                Some(("cid", n)) => {
                    let n: u64 = n.parse().map_err(|_| bad(format!("bad cid {n:?}")))?;
                    if !VSOCK_CIDS.contains(&n) {
                        return Err(bad(format!("cid must be from 3 to {}", VSOCK_CIDS.end - 1)));
                    }
                    cid = Some(n);
                }
                Some(("uds", path)) if !path.is_empty() => uds = Some(PathBuf::from(path)),
                _ => return Err(bad(format!("unknown option {opt:?}"))),
            }
        }
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
        let (mut tap, mut mac) = (None, None);
        for opt in spec.split(',') {
            match opt.split_once('=') {
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("mac", value)) => {
                    mac = Some(parse_mac(value).map_err(|e| bad(e.to_string()))?)
                }
                _ => return Err(bad(format!("unknown option {opt:?}"))),
            }
        }
        let tap = tap.ok_or_else(|| bad("tap=NAME is required".into()))?;
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
        let mut parts = spec.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or(bad("no path"))?;
        let mut disk = DiskConfig {
            path: PathBuf::from(path),
            read_only: false,
            serial: None,
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => disk.read_only = true,
                Some(("serial", id)) if !id.is_empty() && id.len() <= MAX_DISK_SERIAL => {
                    disk.serial = Some(id.to_string())
                }
                Some(("serial", _)) => return Err(bad("serial must be 1 to 20 bytes")),
                _ => return Err(bad(&format!("unknown option {opt:?}"))),
            }
        }
        Ok(disk)
    }
}

/// The kernel command line used when `--cmdline` is not given, after the console.
pub const DEFAULT_CMDLINE: &str =
    "reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The default command line for a console device.
pub fn default_cmdline(console: ConsoleKind) -> String {
    match console {
        ConsoleKind::Serial => format!("console=ttyS0 {DEFAULT_CMDLINE}"),
        ConsoleKind::Virtio => format!("console=hvc0 {DEFAULT_CMDLINE}"),
        ConsoleKind::None => DEFAULT_CMDLINE.to_string(),
    }
}

/// A validated VM description: what [`crate::vmm::Vmm::build`] needs and nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// `None`: choose from the host (see [`crate::vstate::kvm::KvmHost`]).
    pub cpu_template: Option<CpuTemplate>,
    pub console: ConsoleKind,
    /// Virtio disks in guest order: the root filesystem first when there is one.
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub rng: bool,
    pub vsock: Option<VsockConfig>,
    pub seccomp: Seccomp,
    /// Describe the machine with ACPI tables (and offer S5 power-off).
    pub acpi: bool,
}

impl VmConfig {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

impl TryFrom<VmArgs> for VmConfig {
    type Error = ConfigError;

    fn try_from(cli: VmArgs) -> Result<Self, ConfigError> {
        let kernel = cli.kernel.ok_or(ConfigError::NoKernel)?;
        let vcpus = match u8::try_from(cli.cpus) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => n,
            _ => return Err(ConfigError::Cpus(cli.cpus)),
        };
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&cli.memory) {
            return Err(ConfigError::Memory(cli.memory));
        }
        check_regular_file("kernel", &kernel)?;
        check_kernel_image(&kernel)?;
        if let Some(initrd) = &cli.initrd {
            check_regular_file("initrd", initrd)?;
            let size = fs::metadata(initrd).map_or(0, |m| m.len());
            if size >= cli.memory << 20 {
                return Err(ConfigError::InitrdTooLarge {
                    path: initrd.display().to_string(),
                    mib: size.div_ceil(1 << 20),
                    memory: cli.memory,
                });
            }
        }
        let mut cmdline = cli.cmdline.unwrap_or_else(|| default_cmdline(cli.console));
        let mut disks = Vec::new();
        if let Some(rootfs) = cli.rootfs {
            disks.push(DiskConfig {
                path: rootfs,
                read_only: false,
                serial: None,
            });
            cmdline.push_str(" root=/dev/vda rw");
        }
        for spec in &cli.disk {
            disks.push(spec.parse()?);
        }
        check_disks(&disks)?;
        let nets = cli
            .net
            .iter()
            .map(|spec| spec.parse())
            .collect::<Result<Vec<NetConfig>, _>>()?;
        let vsock = cli.vsock.as_deref().map(str::parse).transpose()?;
        let count = disks.len()
            + nets.len()
            + usize::from(cli.rng)
            + usize::from(vsock.is_some())
            + usize::from(cli.console == ConsoleKind::Virtio);
        let max = rvmm_firmware::layout::VIRTIO_SLOT_COUNT;
        if count > max as usize {
            return Err(ConfigError::TooManyDevices { count, max });
        }
        if cmdline.len() >= rvmm_firmware::layout::CMDLINE_MAX_LEN {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        Ok(VmConfig {
            kernel,
            initrd: cli.initrd,
            cmdline,
            vcpus,
            memory_mib: cli.memory,
            cpu_template: cli.cpu_template,
            console: cli.console,
            disks,
            nets,
            rng: cli.rng,
            vsock,
            seccomp: cli.seccomp,
            acpi: !cli.no_acpi,
        })
    }
}

/// Every disk must be a non-empty regular file, and none may appear twice (under any name:
/// symbolic or hard links): two virtio disks on one image would corrupt it.
fn check_disks(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    let mut seen = Vec::new();
    for disk in disks {
        check_regular_file("disk", &disk.path)?;
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

    fn parse(args: &[&str]) -> Result<VmConfig, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("rvmm").chain(args.iter().copied()))
            .expect("clap accepts the arguments");
        VmConfig::try_from(cli.vm)
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
        let cfg = parse(&["--kernel", k.as_path().to_str().unwrap()]).unwrap();
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.memory_mib, 128);
        assert_eq!(cfg.memory_bytes(), 128 << 20);
        assert!(cfg.cmdline.contains("console=ttyS0"));
        assert_eq!(cfg.cpu_template, None);
        assert_eq!(cfg.console, ConsoleKind::Serial);
        assert!(cfg.disks.is_empty());
        assert!(cfg.acpi);
        let cfg = parse(&["--kernel", k.as_path().to_str().unwrap(), "--no-acpi"]).unwrap();
        assert!(!cfg.acpi);
    }

    #[test]
    fn default_cmdline_follows_the_console() {
        let k = kernel_file();
        let k = k.as_path().to_str().unwrap();
        let cfg = parse(&["--kernel", k, "--console", "virtio"]).unwrap();
        assert!(cfg.cmdline.starts_with("console=hvc0 reboot=k"));
        let cfg = parse(&["--kernel", k, "--console", "virtio", "--cmdline", "quiet"]).unwrap();
        assert_eq!(cfg.cmdline, "quiet");
    }

    #[test]
    fn disk_specs() {
        let d: DiskConfig = "/img,ro,serial=abc".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img".into(),
                read_only: true,
                serial: Some("abc".into())
            }
        );
        let d: DiskConfig = "/img".parse().unwrap();
        assert!(!d.read_only && d.serial.is_none());
        for bad in [
            "",
            ",ro",
            "/img,rw",
            "/img,serial=",
            "/img,serial=123456789012345678901",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn net_specs() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        let n: NetConfig = "tap=t1".parse().unwrap();
        assert_eq!(n.mac, None);
        let again: NetConfig = "tap=t1".parse().unwrap();
        let other: NetConfig = "tap=t2".parse().unwrap();
        assert_eq!(n.guest_mac(), again.guest_mac());
        assert_ne!(n.guest_mac(), other.guest_mac());
        assert_eq!(n.guest_mac()[0], 0x52);
        for bad in [
            "",
            "tap=",
            "mac=52:54:00:12:34:56",
            "tap=t,mac=zz",
            "tap=t,mtu=9000",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad:?}");
        }
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
    fn rootfs_is_vda_and_sets_root() {
        let k = kernel_file();
        let root = kernel_file();
        let extra = kernel_file();
        let extra_spec = format!("{},ro,serial=data1", extra.as_path().display());
        let cfg = parse(&[
            "--kernel",
            k.as_path().to_str().unwrap(),
            "--rootfs",
            root.as_path().to_str().unwrap(),
            "--disk",
            &extra_spec,
        ])
        .unwrap();
        assert!(cfg.cmdline.ends_with(" root=/dev/vda rw"));
        assert_eq!(cfg.disks.len(), 2);
        assert_eq!(cfg.disks[0].path, root.as_path());
        assert!(cfg.disks[1].read_only);
    }

    #[test]
    fn refuses_a_disk_given_twice() {
        let k = kernel_file();
        let root = kernel_file();
        let root = root.as_path().to_str().unwrap();
        let err = parse(&[
            "--kernel",
            k.as_path().to_str().unwrap(),
            "--rootfs",
            root,
            "--disk",
            root,
        ]);
        assert_eq!(err, Err(ConfigError::DuplicateDisk(root.to_string())));
        let err = parse(&["--kernel", k.as_path().to_str().unwrap(), "--disk", "/tmp"]);
        assert!(err.unwrap_err().to_string().ends_with("not a regular file"));
    }

    #[test]
    fn refuses_bad_counts() {
        let k = kernel_file();
        let k = k.as_path().to_str().unwrap();
        assert_eq!(
            parse(&["--kernel", k, "--cpus", "0"]),
            Err(ConfigError::Cpus(0))
        );
        assert_eq!(
            parse(&["--kernel", k, "--cpus", "33"]),
            Err(ConfigError::Cpus(33))
        );
        assert_eq!(
            parse(&["--kernel", k, "--cpus", "100000"]),
            Err(ConfigError::Cpus(100_000))
        );
        assert_eq!(
            parse(&["--kernel", k, "--memory", "0"]),
            Err(ConfigError::Memory(0))
        );
        assert_eq!(
            parse(&["--kernel", k, "--memory", "99999999"]),
            Err(ConfigError::Memory(99_999_999))
        );
    }

    #[test]
    fn refuses_bad_files() {
        let missing = parse(&["--kernel", "/nonexistent/vmlinux"]).unwrap_err();
        assert!(missing
            .to_string()
            .starts_with("kernel /nonexistent/vmlinux:"));
        let dir = parse(&["--kernel", "/tmp"]).unwrap_err();
        assert!(dir.to_string().ends_with("not a regular file"));
        let empty = TempFile::new().unwrap();
        let err = parse(&["--kernel", empty.as_path().to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().ends_with("file is empty"));
        let k = kernel_file();
        let err = parse(&[
            "--kernel",
            k.as_path().to_str().unwrap(),
            "--initrd",
            "/nonexistent",
        ])
        .unwrap_err();
        assert!(err.to_string().starts_with("initrd /nonexistent:"));
    }

    #[test]
    fn refuses_long_cmdline() {
        let k = kernel_file();
        let long = "x".repeat(5000);
        let err = parse(&[
            "--kernel",
            k.as_path().to_str().unwrap(),
            "--cmdline",
            &long,
        ]);
        assert_eq!(err, Err(ConfigError::CmdlineTooLong(5000)));
    }
}
