//! The VM rows of the cpu, disk, net and fs figures: a Linux guest whose /init is the workload
//! agent runs the same workloads under rvmm and under QEMU microvm (same kernel, root disk,
//! data disks, TAP and virtio-fs share) and prints their results. When a guest's agent never finishes, that
//! VMM's rows are skipped with what the guest printed last.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::container::ip;
use super::ctx::{progress, Ctx, Step};
use super::fs::{FsData, QemuVirtiofsd};
use super::report::{Figure, Variant};
use super::runner::{field, last_line, run, RunError, Watch};
use super::tools::install_with_libs;
use super::workloads::{fio_terse, iperf_bps, server, CPU_ROUNDS, IPERF_PORT, RR_PORT};
use rvmm_container::image::disk::DiskCache;

const READY: &str = "RVMM-BENCH-GUEST ready";
const DONE: &str = "RVMM-BENCH-GUEST done";
/// Console lines after which the agent can no longer finish: the pass is stopped at once.
/// (`quiet` hides the kernel's info-level lines, such as init's segfault report.)
const GIVE_UP: &[&str] = &["Kernel panic - not syncing", "Attempted to kill init"];
/// The guest root holds a few tens of MiB; anything near this means a wrong tool path.
const ROOT_MAX_BYTES: u64 = 1 << 30;
/// A Linux boot takes ~1 minute on an emulating KVM and the workloads a few more, longer
/// when the machine is busy.
const PASS_TIMEOUT: Duration = Duration::from_secs(900);
/// The fs step's pass: QEMU + virtiofsd took ~10 minutes to extract the 5 000 files on a KVM
/// nested in TCG.
const FS_PASS_TIMEOUT: Duration = Duration::from_secs(1800);
const GUEST_MIB: &str = "256";
const TAP_HOST_IP: &str = "10.231.1.1";
const TAP_GUEST_IP: &str = "10.231.1.2";
/// The agent's system-call timing, in the guest and on the host.
const SYSCALL: &str = "RVMM-BENCH syscall usec=";
const HOST_SYSCALLS: &str = "100000";

/// The guest kernel built by resources/build-guest.sh.
fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RVMM_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    cache.join("rvmm/guest")
}

/// The guest kernel the VM rows boot.
const KERNEL: &str = "vmlinux";

/// A TAP device for the guest with the host end addressed; deleted on drop.
struct Tap(String);

impl Tap {
    fn create() -> Result<Tap, String> {
        let tap = Tap(format!("rvbt{}", std::process::id()));
        let e = |e: super::container::ContainerError| rvmm_vmm::error_chain(&e);
        ip(&["tuntap", "add", "dev", &tap.0, "mode", "tap"]).map_err(e)?;
        ip(&["addr", "add", &format!("{TAP_HOST_IP}/30"), "dev", &tap.0]).map_err(e)?;
        ip(&["link", "set", &tap.0, "up"]).map_err(e)?;
        Ok(tap)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// The guest's root disk: the agent as /init plus fio and iperf3 with their libraries (the
/// agent mounts a tmpfs on /tmp, where iperf3 keeps its send buffer). A disk
/// root, not an initramfs: these tools and their libraries are tens of MiB, which the kernel
/// would copy into RAM at every boot (minutes on an emulating KVM), while a disk root reads
/// only the pages that run.
fn root_disk(ctx: &Ctx) -> Result<PathBuf, String> {
    let root = ctx.work.join("guest-root");
    let err = |e: &dyn std::error::Error| rvmm_vmm::error_chain(e);
    for dir in ["proc", "dev", "sys", "tmp", "bin"] {
        std::fs::create_dir_all(root.join(dir)).map_err(|e| err(&e))?;
    }
    std::fs::copy(&ctx.tools.agent, root.join("init")).map_err(|e| err(&e))?;
    for tool in [&ctx.tools.fio, &ctx.tools.iperf3].into_iter().flatten() {
        install_with_libs(tool, &root).map_err(|e| err(&e))?;
    }
    let out = ctx.work.join("guest-root.ext4");
    let mkfs = DiskCache {
        dir: ctx.work.clone(),
        max_bytes: ROOT_MAX_BYTES,
    };
    mkfs.make_ext4(&root, &out).map_err(|e| err(&e))?;
    Ok(out)
}

/// What one guest pass printed: values per figure id, and its system-call time.
#[derive(Debug, Default, PartialEq)]
struct Printed {
    values: Vec<(&'static str, f64)>,
    syscall_usec: Option<f64>,
    /// What the fs step printed instead of its figures.
    fs_error: Option<String>,
}

fn parse(console: &str) -> Printed {
    let mut values = Vec::new();
    if let Some(v) = field(console, "RVMM-BENCH cpu mflops=") {
        values.push(("cpu.matmul", v));
    }
    let mut fio = console
        .lines()
        .filter_map(|l| l.find("3;").map(|i| &l[i..]))
        .filter_map(fio_terse);
    if let (Some((_, iops)), Some((kib_s, _))) = (fio.next(), fio.next()) {
        values.push(("disk.randread", iops / 1000.0));
        values.push(("disk.seqread", kib_s / 1024.0));
    }
    for (id, marker) in [("net.tcp", "iperf3"), ("net.tcp_rx", "iperf3-reverse")] {
        let between = |console: &str| -> Option<f64> {
            let rest = console
                .split(&format!("RVMM-BENCH {marker}-begin"))
                .nth(1)?;
            iperf_bps(rest.split(&format!("RVMM-BENCH {marker}-end")).next()?)
        };
        if let Some(bps) = between(console) {
            values.push((id, bps / 1e9));
        }
    }
    if let Some(v) = field(console, "RVMM-BENCH rr usec=") {
        values.push(("net.rr", v));
    }
    values.extend(super::fs::guest_values(console));
    Printed {
        values,
        syscall_usec: field(console, SYSCALL),
        fs_error: super::fs::guest_error(console),
    }
}

/// The guest's disks besides its root: the disk step's raw file and the fs step's data.
pub struct Disks<'a> {
    pub data: Option<&'a Path>,
    /// Present when the fs step runs.
    pub fs: Option<&'a FsData>,
}

/// What every pass boots, whichever VMM runs it.
struct Guest<'a> {
    kernel: PathBuf,
    root: PathBuf,
    disks: &'a Disks<'a>,
    steps: &'a [Step],
}

impl Guest<'_> {
    /// The kernel command line both VMMs pass (rvmm adds the root and CPU parameters itself).
    fn cmdline(&self) -> String {
        let names: Vec<String> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Cpu => format!("cpu:{CPU_ROUNDS}"),
                Step::Disk => "disk".into(),
                Step::Fs => "fs".into(),
                _ => "net".into(),
            })
            .collect();
        format!(
            "console=ttyS0 reboot=k panic=1 quiet i8042.noaux i8042.nomux i8042.nopnp \
             i8042.dumbkbd init=/init rvmm_bench={} rvmm_bench_ip={TAP_GUEST_IP},{TAP_HOST_IP}",
            names.join(",")
        )
    }

    fn rvmm(&self, rvmm: &Path, tap: Option<&str>) -> Command {
        let mut cmd = Command::new(rvmm);
        cmd.arg("--kernel").arg(&self.kernel);
        cmd.arg("--rootfs").arg(&self.root);
        cmd.args(["--memory", GUEST_MIB]);
        if let Some(data) = self.disks.data {
            cmd.arg("--disk").arg(format!("{},ro", data.display()));
        }
        if let Some(fs) = self.disks.fs {
            cmd.arg("--disk").arg(&fs.disk);
            cmd.arg("--share")
                .arg(format!("{},tag={}", fs.share.display(), super::fs::TAG));
        }
        if let Some(tap) = tap {
            cmd.args(["--net", &format!("tap={tap}")]);
        }
        cmd.arg("--cmdline").arg(self.cmdline());
        cmd.env("RUST_LOG", "error");
        cmd
    }

    /// QEMU microvm with the same devices on virtio-mmio; its ACPI DSDT describes them (vda is
    /// the first). virtio-fs needs its RAM shared with virtiofsd, as rvmm's is then.
    fn qemu(&self, qemu: &Path, tap: Option<&str>, fs_socket: Option<&Path>) -> Command {
        let cmdline = self.cmdline() + " root=/dev/vda rw";
        let mut cmd = Command::new(qemu);
        let machine = match fs_socket {
            Some(_) => "microvm,accel=kvm,memory-backend=mem",
            None => "microvm,accel=kvm",
        };
        // Virtio 1.x on virtio-mmio, as rvmm's devices are: microvm's default is the legacy
        // transport, where virtio-fs cannot negotiate VERSION_1.
        cmd.args(["-M", machine, "-cpu", "host", "-smp", "1"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-m", GUEST_MIB, "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-append")
            .arg(cmdline);
        let mut drives = vec![(self.root.as_path(), "root", "")];
        drives.extend(self.disks.data.map(|d| (d, "data", ",readonly=on")));
        drives.extend(self.disks.fs.map(|fs| (fs.disk.as_path(), "fs", "")));
        for (path, id, extra) in drives {
            cmd.arg("-drive")
                .arg(format!(
                    "id={id},file={},format=raw,if=none{extra}",
                    path.display()
                ))
                .args(["-device", &format!("virtio-blk-device,drive={id}")]);
        }
        if let Some(tap) = tap {
            cmd.args([
                "-netdev",
                &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
                "-device",
                "virtio-net-device,netdev=net0",
            ]);
        }
        if let Some(socket) = fs_socket {
            let size = format!("memory-backend-memfd,id=mem,size={GUEST_MIB}M,share=on");
            cmd.args(["-object", &size, "-chardev"])
                .arg(format!("socket,id=fs0,path={}", socket.display()))
                .args([
                    "-device",
                    &format!("vhost-user-fs-device,chardev=fs0,tag={}", super::fs::TAG),
                ]);
        }
        cmd
    }
}

/// What one guest pass printed, or why it printed nothing usable.
type PassResult = Result<Printed, String>;

/// Boots the guest once under `variant`; Err is the reason its VM rows are skipped.
fn guest_pass(ctx: &Ctx, variant: Variant, guest: &Guest) -> Result<PassResult, RunError> {
    let tap = match guest.steps.contains(&Step::Net).then(Tap::create) {
        Some(Err(e)) => return Ok(Err(e)),
        tap => tap.and_then(Result::ok),
    };
    let tap_name = tap.as_ref().map(|t| t.0.as_str());
    if let Some(Err(e)) = guest.disks.fs.map(FsData::reset) {
        return Ok(Err(rvmm_vmm::error_chain(&e)));
    }
    let virtiofsd = match (variant, guest.disks.fs) {
        (Variant::Qemu, Some(fs)) => match QemuVirtiofsd::start(&ctx.work, fs) {
            Ok(d) => Some(d),
            Err(e) => return Ok(Err(e)),
        },
        _ => None,
    };
    let mut cmd = match variant {
        Variant::Qemu => match &ctx.tools.qemu {
            Some(qemu) => guest.qemu(
                qemu,
                tap_name,
                virtiofsd.as_ref().map(|d| d.socket.as_path()),
            ),
            None => return Ok(Err("qemu-system-x86_64 is not installed".into())),
        },
        _ => guest.rvmm(&ctx.tools.rvmm, tap_name),
    };
    let what = format!("{} with the bench guest", variant.label());
    // The agent prints everything before DONE; what the VMM does after it does not matter.
    let mut stop = |_| true;
    let timeout = match guest.steps.contains(&Step::Fs) {
        true => FS_PASS_TIMEOUT,
        false => PASS_TIMEOUT,
    };
    let mut watch = Watch::new(&what, timeout, DONE);
    watch.on_marker = Some(&mut stop);
    watch.any_status = true;
    watch.give_up = GIVE_UP;
    let m = match run(&mut cmd, watch) {
        Err(RunError::Cancelled) => return Err(RunError::Cancelled),
        Err(e) => return Ok(Err(rvmm_vmm::error_chain(&e))),
        Ok(m) => m,
    };
    if m.first_line.is_some() {
        return Ok(Ok(parse(&m.stdout)));
    }
    let seen = match &m.gave_up {
        Some(line) => format!("the guest kernel gave up after {:.0} s: {line:?}", m.wall),
        None => format!(
            "{} ended after {:.0} s without it (last console line: {:?})",
            variant.label(),
            m.wall,
            last_line(&m.stdout)
        ),
    };
    let agent = match m.stdout.contains(READY) {
        true => "the bench agent did not finish in the guest",
        false => "the bench agent never started in the guest",
    };
    Ok(Err(format!("{agent}: {seen}")))
}

/// Why no guest can be booted here, if so.
fn unavailable(ctx: &Ctx, kernel: &Path) -> Option<String> {
    if let Err(e) = &ctx.kvm {
        return Some(e.clone());
    }
    if ctx.emulated {
        return Some(
            "guest user space cannot run on this emulating KVM (kvm_pvm); run the bench on a \
             real KVM, e.g. inside resources/nested-kvm.sh"
                .into(),
        );
    }
    if kernel.is_file() {
        return None;
    }
    Some(format!(
        "no {} in {} (resources/build-guest.sh builds it)",
        kernel.file_name().unwrap_or_default().to_string_lossy(),
        guest_dir().display()
    ))
}

/// What `ctx.runs` passes under one VMM printed.
#[derive(Default)]
struct VmmSamples {
    /// Samples by figure id.
    values: Vec<(&'static str, Vec<f64>)>,
    syscalls: Vec<f64>,
    /// The first thing the fs step printed instead of its figures.
    fs_error: Option<String>,
}

impl VmmSamples {
    /// Why `fig` has no sample from every pass.
    fn missing(&self, fig: &Figure) -> String {
        match &self.fs_error {
            Some(e) if fig.id.starts_with("fs.") => format!("the guest printed {e:?}"),
            _ => "the guest did not print this workload's result in every run".into(),
        }
    }
}

fn passes(
    ctx: &Ctx,
    variant: Variant,
    guest: &Guest,
) -> Result<Result<VmmSamples, String>, RunError> {
    let mut out = VmmSamples::default();
    for i in 0..ctx.runs {
        progress(&format!(
            "guest steps: {} Linux guest, run {} of {}",
            variant.label(),
            i + 1,
            ctx.runs
        ));
        let printed = match guest_pass(ctx, variant, guest)? {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        out.syscalls.extend(printed.syscall_usec);
        out.fs_error = out.fs_error.or(printed.fs_error);
        for (id, v) in printed.values {
            match out.values.iter_mut().find(|s| s.0 == id) {
                Some(s) => s.1.push(v),
                None => out.values.push((id, vec![v])),
            }
        }
    }
    Ok(Ok(out))
}

/// Adds the rvmm and QEMU rows to the cpu/disk/net/fs figures; returns notes for the report.
pub fn add_vm_rows(
    ctx: &Ctx,
    steps: &[Step],
    disks: &Disks,
    figures: &mut [Figure],
) -> Result<Vec<String>, RunError> {
    let kernel = guest_dir().join(KERNEL);
    let root = match unavailable(ctx, &kernel) {
        Some(reason) => Err(reason),
        None => root_disk(ctx),
    };
    let root = match root {
        Ok(root) => root,
        Err(reason) => {
            for fig in figures.iter_mut() {
                fig.skipped(Variant::Rvmm, &reason);
                fig.skipped(Variant::Qemu, &reason);
            }
            return Ok(Vec::new());
        }
    };
    let guest = Guest {
        kernel,
        root,
        disks,
        steps,
    };
    let _servers = (
        server(&[&ctx.tools.agent.display().to_string(), "rr-server", RR_PORT])?,
        ctx.tools
            .iperf3
            .as_ref()
            .map(|i| server(&[&i.display().to_string(), "-s", "-p", IPERF_PORT]))
            .transpose()?,
    );
    let mut syscalls = Vec::new();
    for variant in [Variant::Rvmm, Variant::Qemu] {
        let outcome = passes(ctx, variant, &guest)?;
        if let Ok(out) = &outcome {
            if let Some(median) = super::stats::Summary::of(&out.syscalls).map(|s| s.median) {
                syscalls.push((variant, median));
            }
        }
        for fig in figures.iter_mut() {
            match &outcome {
                Err(reason) => fig.skipped(variant, reason),
                Ok(out) => match out.values.iter().find(|s| s.0 == fig.id) {
                    Some((_, s)) if s.len() == ctx.runs as usize => fig.samples(variant, s.clone()),
                    _ => fig.skipped(variant, &out.missing(fig)),
                },
            }
        }
    }
    Ok(vec![guest_note(ctx, &syscalls)])
}

/// Which kernel the guest passes booted, and what a guest system call cost.
fn guest_note(ctx: &Ctx, syscalls: &[(Variant, f64)]) -> String {
    let mut note = format!(
        "The VM rows of the guest steps boot `{KERNEL}` from {}",
        guest_dir().display()
    );
    let measured: Vec<String> = syscalls
        .iter()
        .map(|(v, usec)| format!("{usec:.2} µs under {}", v.label()))
        .collect();
    let host = host_syscall_usec(ctx)
        .map(|h| format!(" against {h:.2} µs as a host process"))
        .unwrap_or_default();
    note.push('.');
    if !measured.is_empty() {
        note.push_str(&format!(
            " A guest system call (getppid) took {}{host}.",
            measured.join(" and ")
        ));
    }
    note
}

/// Mean time of one getppid as a host process, for comparison with the guests'.
fn host_syscall_usec(ctx: &Ctx) -> Option<f64> {
    let mut cmd = Command::new(&ctx.tools.agent);
    cmd.args(["syscall", HOST_SYSCALLS]);
    let m = run(
        &mut cmd,
        Watch::new("agent syscall", Duration::from_secs(30), SYSCALL),
    )
    .ok()?;
    field(&m.stdout, SYSCALL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_guest_pass_console() {
        // Shortened from a real pass of the agent under QEMU TCG, as it reaches the console.
        let console = "Run /init as init process\nRVMM-BENCH-GUEST ready\n\
                       RVMM-BENCH syscall usec=993.099\n\
                       RVMM-BENCH cpu mflops=76.652 check=5.459e+02\n\
                       3;fio-3.33;randread;0;0;65632;21870;5467;3001;18\n\
                       3;fio-3.33;seqread;0;0;3763200;1253564;1224;3002;90\n\
                       RVMM-BENCH iperf3-begin\n{\n\t\"end\":\t{\n\t\t\"sum_received\":\t{\n\
                       \t\t\t\"bits_per_second\":\t651402017.839475\n\t\t}\n\t}\n}\n\
                       RVMM-BENCH iperf3-end\nRVMM-BENCH iperf3-reverse-begin\n{\n\t\"end\":\t{\n\
                       \t\t\"sum_received\":\t{\n\t\t\t\"bits_per_second\":\t802000000.5\n\t\t}\n\t}\n}\n\
                       RVMM-BENCH iperf3-reverse-end\nRVMM-BENCH rr usec=527.214\nRVMM-BENCH-GUEST done\n";
        let got = parse(console);
        let want = [
            ("cpu.matmul", 76.652),
            ("disk.randread", 5.467),
            ("disk.seqread", 1253564.0 / 1024.0),
            ("net.tcp", 0.651402017839475),
            ("net.tcp_rx", 0.8020000005),
            ("net.rr", 527.214),
        ];
        assert_eq!(got.values.len(), want.len(), "{got:?}");
        for ((id, v), (want_id, want_v)) in got.values.iter().zip(want) {
            assert_eq!(*id, want_id);
            assert!((v - want_v).abs() < 1e-9, "{id}: {v} vs {want_v}");
        }
        assert_eq!(got.syscall_usec, Some(993.099));
    }

    #[test]
    fn both_vmms_boot_the_same_kernel_disks_and_command_line() {
        let fs = FsData {
            share: PathBuf::from("/tmp/share"),
            disk: PathBuf::from("/tmp/fs.ext4"),
        };
        let disks = Disks {
            data: Some(Path::new("/tmp/data.img")),
            fs: Some(&fs),
        };
        let guest = Guest {
            kernel: PathBuf::from("/k/vmlinux"),
            root: PathBuf::from("/tmp/root.ext4"),
            disks: &disks,
            steps: &[Step::Cpu, Step::Net, Step::Fs],
        };
        let cmdline = guest.cmdline();
        assert!(
            cmdline.contains(&format!("rvmm_bench=cpu:{CPU_ROUNDS},net,fs ")),
            "{cmdline}"
        );
        let socket = Path::new("/tmp/fs.sock");
        let qemu = guest.qemu(
            Path::new("/usr/bin/qemu-system-x86_64"),
            Some("tap0"),
            Some(socket),
        );
        let qemu = guest_args(&qemu);
        for want in [
            "microvm,accel=kvm,memory-backend=mem",
            "virtio-mmio.force-legacy=false",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "socket,id=fs0,path=/tmp/fs.sock",
            "vhost-user-fs-device,chardev=fs0,tag=benchfs",
            "id=fs,file=/tmp/fs.ext4,format=raw,if=none",
            "host",
            "/k/vmlinux",
            "id=root,file=/tmp/root.ext4,format=raw,if=none",
            "id=data,file=/tmp/data.img,format=raw,if=none,readonly=on",
            "tap,id=net0,ifname=tap0,script=no,downscript=no",
        ] {
            assert!(qemu.iter().any(|a| a == want), "{want} not in {qemu:?}");
        }
        let append = &qemu[qemu.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.starts_with(&cmdline), "{append}");
        assert!(append.ends_with("root=/dev/vda rw"));
        // The root disk is the first virtio-mmio device: vda in the guest.
        let root = qemu.iter().position(|a| a.starts_with("id=root")).unwrap();
        let data = qemu.iter().position(|a| a.starts_with("id=data")).unwrap();
        assert!(root < data);
        let rvmm = guest_args(&guest.rvmm(Path::new("/bin/rvmm"), None));
        for want in ["/tmp/data.img,ro", "/tmp/fs.ext4", "/tmp/share,tag=benchfs"] {
            assert!(rvmm.iter().any(|a| a == want), "{want} not in {rvmm:?}");
        }
    }

    fn guest_args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }
}
