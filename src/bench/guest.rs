//! The VM rows of the cpu, disk and net figures: a Linux guest whose /init is the workload
//! agent runs the same workloads and prints their results. When the guest's userspace never
//! starts (no ready line), every VM row is skipped with what the guest printed last.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::container::ip;
use super::report::{Figure, Variant};
use super::runner::{last_line, run, RunError, Watch};
use super::tools::install_with_libs;
use super::workloads::{field, fio_terse, iperf_bps, server, IPERF_PORT, RR_PORT};
use super::{progress, Ctx, Step};
use crate::container::image::disk::DiskCache;

const READY: &str = "RVMM-BENCH-GUEST ready";
/// Console lines after which the agent can no longer start: the pass is stopped at once.
/// (`quiet` hides the kernel's info-level lines, such as init's segfault report.)
const GIVE_UP: &[&str] = &["Kernel panic - not syncing", "Attempted to kill init"];
/// The guest root holds a few tens of MiB; anything near this means a wrong tool path.
const ROOT_MAX_BYTES: u64 = 1 << 30;
/// A Linux boot takes ~1 minute on an emulating KVM, longer when the machine is busy.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const TAP_HOST_IP: &str = "10.231.1.1";
const TAP_GUEST_IP: &str = "10.231.1.2";

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

/// A TAP device for the guest with the host end addressed; deleted on drop.
struct Tap(String);

impl Tap {
    fn create() -> Result<Tap, String> {
        let tap = Tap(format!("rvbt{}", std::process::id()));
        let e = |e: super::container::ContainerError| crate::error_chain(&e);
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

/// The guest's root disk: the agent as /init plus fio and iperf3 with their libraries. A disk
/// root, not an initramfs: these tools and their libraries are tens of MiB, which the kernel
/// would copy into RAM at every boot (minutes on an emulating KVM), while a disk root reads
/// only the pages that run.
fn root_disk(ctx: &Ctx) -> Result<PathBuf, String> {
    let root = ctx.work.join("guest-root");
    let err = |e: &dyn std::error::Error| crate::error_chain(e);
    // /tmp: iperf3 keeps its send buffer in a temporary file.
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

/// What one guest pass printed, per figure id.
fn parse(console: &str) -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    if let Some(v) = field(console, "RVMM-BENCH cpu mflops=") {
        out.push(("cpu.matmul", v));
    }
    let mut fio = console
        .lines()
        .filter_map(|l| l.find("3;").map(|i| &l[i..]))
        .filter_map(fio_terse);
    if let (Some((_, iops)), Some((kib_s, _))) = (fio.next(), fio.next()) {
        out.push(("disk.randread", iops / 1000.0));
        out.push(("disk.seqread", kib_s / 1024.0));
    }
    if let Some(bps) = console
        .split("RVMM-BENCH iperf3-begin")
        .nth(1)
        .and_then(|rest| iperf_bps(rest.split("RVMM-BENCH iperf3-end").next()?))
    {
        out.push(("net.tcp", bps / 1e9));
    }
    if let Some(v) = field(console, "RVMM-BENCH rr usec=") {
        out.push(("net.rr", v));
    }
    out
}

/// Figure id → value of one guest pass, or why the guest printed none.
type PassResult = Result<Vec<(&'static str, f64)>, String>;

/// Boots the guest once; Err is the reason the VM rows are skipped.
fn guest_pass(ctx: &Ctx, steps: &[Step], disk: &Path, root: &Path) -> Result<PassResult, RunError> {
    let kernel = guest_dir().join("vmlinux");
    let names: Vec<&str> = steps
        .iter()
        .map(|s| match s {
            Step::Cpu => "cpu:20",
            Step::Disk => "disk",
            _ => "net",
        })
        .collect();
    let tap = match steps.contains(&Step::Net) {
        true => Some(Tap::create()),
        false => None,
    };
    let mut cmd = Command::new(&ctx.tools.rvmm);
    cmd.arg("--kernel").arg(&kernel).arg("--rootfs").arg(root);
    cmd.args(["--memory", "256", "--disk"])
        .arg(format!("{},ro", disk.display()));
    if let Some(tap) = &tap {
        match tap {
            Ok(t) => cmd.args(["--net", &format!("tap={}", t.0)]),
            Err(e) => return Ok(Err(e.clone())),
        };
    }
    cmd.arg("--cmdline").arg(format!(
        "console=ttyS0 reboot=k panic=1 quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd \
         init=/init rvmm_bench={} rvmm_bench_ip={TAP_GUEST_IP},{TAP_HOST_IP}",
        names.join(",")
    ));
    cmd.env("RUST_LOG", "error");
    let mut watch = Watch::new("rvmm with the bench guest", BOOT_TIMEOUT, READY);
    watch.any_status = true;
    watch.give_up = GIVE_UP;
    let m = match run(&mut cmd, watch) {
        Err(RunError::Cancelled) => return Err(RunError::Cancelled),
        Err(e) => return Ok(Err(crate::error_chain(&e))),
        Ok(m) => m,
    };
    if m.first_line.is_none() {
        let host = if ctx.tools_emulated() {
            "; on this host's emulating KVM guest userspace cannot make system calls, so init \
             dies on its first one"
        } else {
            ""
        };
        let seen = match &m.gave_up {
            Some(line) => format!("the guest kernel gave up after {:.0} s: {line:?}", m.wall),
            None => format!(
                "Linux under rvmm ended after {:.0} s without it (last console line: {:?})",
                m.wall,
                last_line(&m.stdout)
            ),
        };
        return Ok(Err(format!(
            "the bench agent never started in the guest: {seen}{host}"
        )));
    }
    Ok(Ok(parse(&m.stdout)))
}

/// Adds the rvmm and QEMU rows to the cpu/disk/net figures.
pub fn add_vm_rows(
    ctx: &Ctx,
    steps: &[Step],
    disk: &Path,
    figures: &mut [Figure],
) -> Result<(), RunError> {
    let qemu_reason = "QEMU runs only the tiny guest (start, memory) in this bench; its guest \
                       workload pass is not implemented";
    let reason = if let Err(e) = &ctx.kvm {
        Some(e.clone())
    } else if !guest_dir().join("vmlinux").is_file() {
        Some(format!(
            "no guest kernel in {} (run resources/build-guest.sh)",
            guest_dir().display()
        ))
    } else {
        None
    };
    let mut samples: Vec<(&'static str, Vec<f64>)> = Vec::new();
    let mut skip = reason;
    if skip.is_none() {
        let root = match root_disk(ctx) {
            Ok(c) => c,
            Err(e) => return skip_all(figures, &e, qemu_reason),
        };
        let _servers = (
            server(&[&ctx.tools.agent.display().to_string(), "rr-server", RR_PORT])?,
            ctx.tools
                .iperf3
                .as_ref()
                .map(|i| server(&[&i.display().to_string(), "-s", "-p", IPERF_PORT]))
                .transpose()?,
        );
        for i in 0..ctx.runs {
            progress(&format!(
                "cpu/disk/net: rvmm Linux guest, run {} of {}",
                i + 1,
                ctx.runs
            ));
            match guest_pass(ctx, steps, disk, &root)? {
                Ok(values) => values.into_iter().for_each(|(id, v)| {
                    match samples.iter_mut().find(|s| s.0 == id) {
                        Some(s) => s.1.push(v),
                        None => samples.push((id, vec![v])),
                    }
                }),
                Err(e) => {
                    skip = Some(e);
                    break;
                }
            }
        }
    }
    for fig in figures.iter_mut() {
        match (&skip, samples.iter().find(|s| s.0 == fig.id)) {
            (Some(reason), _) => fig.skipped(Variant::Rvmm, reason),
            (None, Some((_, s))) if s.len() == ctx.runs as usize => {
                fig.samples(Variant::Rvmm, s.clone())
            }
            (None, _) => fig.skipped(
                Variant::Rvmm,
                "the guest did not print this workload's result in every run",
            ),
        }
        fig.skipped(Variant::Qemu, qemu_reason);
    }
    Ok(())
}

fn skip_all(figures: &mut [Figure], reason: &str, qemu_reason: &str) -> Result<(), RunError> {
    for fig in figures {
        fig.skipped(Variant::Rvmm, reason);
        fig.skipped(Variant::Qemu, qemu_reason);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_guest_pass_console() {
        // Shortened from a real pass of the agent under QEMU TCG, as it reaches the console.
        let console = "Run /init as init process\nRVMM-BENCH-GUEST ready\n\
                       RVMM-BENCH cpu mflops=76.652 check=5.459e+02\n\
                       3;fio-3.33;randread;0;0;65632;21870;5467;3001;18\n\
                       3;fio-3.33;seqread;0;0;3763200;1253564;1224;3002;90\n\
                       RVMM-BENCH iperf3-begin\n{\n\t\"end\":\t{\n\t\t\"sum_received\":\t{\n\
                       \t\t\t\"bits_per_second\":\t651402017.839475\n\t\t}\n\t}\n}\n\
                       RVMM-BENCH iperf3-end\nRVMM-BENCH rr usec=527.214\nRVMM-BENCH-GUEST done\n";
        let got = parse(console);
        let want = [
            ("cpu.matmul", 76.652),
            ("disk.randread", 5.467),
            ("disk.seqread", 1253564.0 / 1024.0),
            ("net.tcp", 0.651402017839475),
            ("net.rr", 527.214),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for ((id, v), (want_id, want_v)) in got.iter().zip(want) {
            assert_eq!(*id, want_id);
            assert!((v - want_v).abs() < 1e-9, "{id}: {v} vs {want_v}");
        }
    }
}
