//! The start and memory steps: "print one line and exit" (or idle) as a process, a crun
//! container, an rvmm tiny guest and a QEMU microvm tiny guest; and the emulation check.

use std::process::Command;
use std::time::Duration;

use super::ctx::{progress, Ctx, Prepared};
use super::machine::EmulationCheck;
use super::report::{Better, Figure, Variant};
use super::runner::{run, RunError, Watch};
use super::tools::SPIN_ITERS;

pub const MARKER: &str = "RVMM-BENCH hello";
const TIMEOUT: Duration = Duration::from_secs(60);
/// Guest RAM of the tiny guests, as in the goal (≤ 5 MiB peak RSS with 128 MiB).
const GUEST_MIB: u64 = 128;
/// Time for an idle workload to settle before its memory is read.
const SETTLE: Duration = Duration::from_millis(300);

/// The tiny workload of `variant`: the agent in `mode` (echo/idle), or the tiny guest ELF.
fn tiny(ctx: &Ctx, variant: Variant, idle: bool) -> Result<Prepared, String> {
    let mode = if idle { "idle" } else { "echo" };
    let kernel = if idle {
        &ctx.tools.tiny_idle
    } else {
        &ctx.tools.tiny
    };
    match variant {
        Variant::Process => {
            let mut cmd = Command::new(&ctx.tools.agent);
            cmd.arg(mode);
            Ok(Prepared {
                cmd,
                _bundle: None,
                any_status: false,
            })
        }
        Variant::Container => ctx.container(&["/bin/agent", mode], None, None),
        Variant::Rvmm => {
            ctx.kvm.clone()?;
            let mut cmd = Command::new(&ctx.tools.rvmm);
            cmd.arg("--kernel")
                .arg(kernel)
                .args(["--memory", &GUEST_MIB.to_string()]);
            cmd.env("RUST_LOG", "error");
            Ok(Prepared {
                cmd,
                _bundle: None,
                any_status: false,
            })
        }
        Variant::Qemu => {
            ctx.kvm.clone()?;
            let qemu = ctx
                .tools
                .qemu
                .as_ref()
                .ok_or("qemu-system-x86_64 is not installed")?;
            let mut cmd = Command::new(qemu);
            cmd.args([
                "-M",
                "microvm,accel=kvm",
                "-no-reboot",
                "-nodefaults",
                "-no-user-config",
            ])
            .args([
                "-display",
                "none",
                "-serial",
                "stdio",
                "-m",
                &GUEST_MIB.to_string(),
            ])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel"])
            .arg(kernel);
            Ok(Prepared {
                cmd,
                _bundle: None,
                any_status: true,
            })
        }
    }
}

fn ms(s: f64) -> f64 {
    s * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Start latency to first output and to exit, CPU time and peak RSS, per variant.
pub fn start(ctx: &Ctx) -> Result<Vec<Figure>, RunError> {
    let mut figs = [
        Figure::new(
            "start.first_output",
            "start to first output",
            "ms",
            Better::Lower,
        ),
        Figure::new("start.exit", "start to exit", "ms", Better::Lower),
        Figure::new(
            "start.cpu",
            "start: CPU time (user+sys)",
            "ms",
            Better::Lower,
        ),
        Figure::new("start.peak_rss", "start: peak RSS", "MiB", Better::Lower),
    ];
    for variant in Variant::ALL {
        progress(&format!("start: {}", variant.label()));
        let mut samples: [Vec<f64>; 4] = Default::default();
        // One unrecorded run first, so that every variant starts with warm caches.
        let outcome = (0..=ctx.runs).try_for_each(|i| {
            let mut p = tiny(ctx, variant, false)?;
            let mut watch = Watch::new(variant.label(), TIMEOUT, MARKER);
            watch.any_status = p.any_status;
            watch.launcher = Some(&ctx.tools.launcher);
            let m = run(&mut p.cmd, watch).map_err(fail_reason)?;
            let first = m
                .first_line
                .ok_or_else(|| format!("{} printed no {MARKER:?}", variant.label()))?;
            let usage = m
                .usage
                .ok_or_else(|| format!("{}: the launcher reported nothing", variant.label()))?;
            if i > 0 {
                let values = [ms(first), ms(m.wall), ms(usage.cpu), mib(usage.max_rss_kib)];
                samples.iter_mut().zip(values).for_each(|(s, v)| s.push(v));
            }
            Ok(())
        });
        record(&mut figs, variant, outcome, samples)?;
    }
    Ok(figs.into())
}

/// A run error as a skip reason; only an interruption ends the bench.
pub fn fail_reason(e: RunError) -> String {
    rvmm_vmm::error_chain(&e)
}

/// Stores the samples, or the skip reason in every figure; a Ctrl-C is passed on.
pub fn record<const N: usize>(
    figs: &mut [Figure; N],
    variant: Variant,
    outcome: Result<(), String>,
    samples: [Vec<f64>; N],
) -> Result<(), RunError> {
    super::runner::check_cancel()?;
    match outcome {
        Ok(()) => figs
            .iter_mut()
            .zip(samples)
            .for_each(|(f, s)| f.samples(variant, s)),
        Err(reason) => figs.iter_mut().for_each(|f| f.skipped(variant, &reason)),
    }
    Ok(())
}

/// Host memory of each variant while its workload idles after printing its line.
pub fn memory(ctx: &Ctx) -> Result<Vec<Figure>, RunError> {
    let mut figs = [
        Figure::new(
            "memory.pss",
            "idle: PSS of all its processes",
            "MiB",
            Better::Lower,
        ),
        Figure::new(
            "memory.rss",
            "idle: RSS of all its processes",
            "MiB",
            Better::Lower,
        ),
        Figure::new(
            "memory.guest",
            "idle: guest RAM touched (of 128 MiB)",
            "MiB",
            Better::Lower,
        ),
    ];
    for variant in Variant::ALL {
        progress(&format!("memory: {}", variant.label()));
        let mut samples: [Vec<f64>; 3] = Default::default();
        let outcome = (0..ctx.runs).try_for_each(|_| {
            let mut p = tiny(ctx, variant, true)?;
            let mut sample = None;
            let mut hook = |pid: u32| {
                std::thread::sleep(SETTLE);
                sample = Some(super::procmem::tree(pid, GUEST_MIB << 10));
                true
            };
            let mut watch = Watch::new(variant.label(), TIMEOUT, MARKER);
            watch.on_marker = Some(&mut hook);
            watch.any_status = p.any_status;
            run(&mut p.cmd, watch).map_err(fail_reason)?;
            let s = sample.ok_or_else(|| format!("{} printed no {MARKER:?}", variant.label()))?;
            samples[0].push(mib(s.pss_kib));
            samples[1].push(mib(s.rss_kib));
            samples[2].push(mib(s.guest_kib));
            Ok(())
        });
        let is_vm = matches!(variant, Variant::Rvmm | Variant::Qemu);
        record(&mut figs, variant, outcome, samples)?;
        if !is_vm {
            figs[2].rows.pop();
            figs[2].skipped(
                variant,
                "no guest memory: the workload runs on the host kernel",
            );
        }
    }
    Ok(figs.into())
}

/// How fast guest kernel-mode code runs here: the tiny guest with and without a loop of
/// SPIN_ITERS × 2 instructions at CPL0, against the same loop as a host process.
pub fn emulation_check(ctx: &Ctx) -> Option<EmulationCheck> {
    ctx.kvm.as_ref().ok()?;
    progress("emulation check: a CPL0 loop in the tiny guest vs the same loop on the host");
    let wall = |kernel: &std::path::Path| {
        let mut cmd = Command::new(&ctx.tools.rvmm);
        cmd.arg("--kernel").arg(kernel).env("RUST_LOG", "error");
        run(&mut cmd, Watch::new("rvmm", TIMEOUT, MARKER))
            .ok()
            .map(|m| m.wall)
    };
    let guest_secs = wall(&ctx.tools.tiny_spin)? - wall(&ctx.tools.tiny)?;
    let host_iters: u64 = 100_000_000;
    let mut cmd = Command::new(&ctx.tools.agent);
    cmd.args(["spin", &host_iters.to_string()]);
    let m = run(
        &mut cmd,
        Watch::new("agent spin", TIMEOUT, "RVMM-BENCH spin"),
    )
    .ok()?;
    let host_secs: f64 = super::runner::field(&m.stdout, "RVMM-BENCH spin seconds=")?;
    if guest_secs <= 0.0 || host_secs <= 0.0 {
        return None;
    }
    Some(EmulationCheck {
        host_mips: 2.0 * host_iters as f64 / host_secs / 1e6,
        guest_kernel_mips: 2.0 * SPIN_ITERS as f64 / guest_secs / 1e6,
    })
}
