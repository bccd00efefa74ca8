//! `rvmm bench`: what a microVM costs next to a container and a plain process. Each step runs
//! the same workload as a process, in a crun container, in an rvmm microVM and in QEMU, and
//! the report gives medians over N runs, native = 1.00.

mod chart;
mod container;
mod ctx;
mod fs;
mod guest;
mod machine;
mod procmem;
mod report;
mod run;
mod runner;
mod runtime;
mod start;
mod stats;
mod tools;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rvmm_vmm::error_chain;

use container::{ContainerError, Rootfs};
pub use ctx::Step;
use ctx::{progress, Ctx};
use machine::{KvmKind, Machine};
use report::{Figure, Report, Variant};
use runner::RunError;
use tools::{Tools, WorkDir};

/// Options of `rvmm bench`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchOptions {
    /// Measured runs per variant and figure (plus one warm-up run for start latency).
    pub runs: u32,
    /// Where report.md, report.json and the SVG charts go.
    pub out: PathBuf,
    /// Steps to run; empty: all.
    pub only: Vec<Step>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Tool(#[from] tools::ToolError),
    #[error(transparent)]
    Report(#[from] report::ReportError),
    #[error(transparent)]
    Chart(#[from] chart::ChartError),
    #[error("cannot create {0}")]
    Io(String, #[source] std::io::Error),
}

pub fn main(args: BenchOptions) -> Result<ExitCode, String> {
    match bench(&args) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(BenchError::Run(RunError::Cancelled)) => {
            progress("interrupted; children stopped and temporary files removed");
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(error_chain(&e)),
    }
}

fn bench(args: &BenchOptions) -> Result<(), BenchError> {
    let steps: Vec<Step> = if args.only.is_empty() {
        Step::ALL.to_vec()
    } else {
        args.only.clone()
    };
    std::fs::create_dir_all(&args.out)
        .map_err(|e| BenchError::Io(args.out.display().to_string(), e))?;
    // Before any thread exists: the private mount namespace needs a single-threaded process.
    let hidden = container::hide_hybrid_cgroup2();
    runner::install_cancel_handlers()?;
    let work = WorkDir::create()?;
    progress("building the workload agent, the launcher and the tiny guest with cc");
    let tools = Tools::build(work.path())?;
    let mut machine = Machine::probe();
    let ctx = Ctx {
        runs: args.runs,
        work: work.path().to_path_buf(),
        rootfs: container_rootfs(work.path(), &tools, hidden),
        kvm: match machine.kvm {
            KvmKind::Absent => Err("/dev/kvm cannot be opened".into()),
            _ => Ok(()),
        },
        emulated: machine.kvm == KvmKind::Emulated,
        tools,
    };
    let mut figures = Vec::new();
    let mut notes = Vec::new();
    if steps.contains(&Step::Start) {
        figures.extend(start::start(&ctx)?);
        notes.extend(vmm_note(&figures));
        machine.emulation = start::emulation_check(&ctx);
    }
    if steps.contains(&Step::Memory) {
        figures.extend(start::memory(&ctx)?);
    }
    figures.extend(guest_steps(&ctx, &steps, &mut notes)?);
    if steps.contains(&Step::Runtime) {
        let (figs, note) = runtime::runtime(&ctx)?;
        figures.extend(figs);
        notes.extend(note);
    }
    if steps.contains(&Step::Run) {
        let (figs, note) = run::run_step(&ctx)?;
        figures.extend(figs);
        notes.extend(note);
    }
    let bench_peak_rss_mib = procmem::own_peak_kib() as f64 / 1024.0;
    notes.extend(rss_note(&figures, bench_peak_rss_mib));
    write_report(
        &args.out,
        Report {
            machine,
            runs: args.runs,
            bench_peak_rss_mib,
            notes,
            figures,
        },
    )
}

fn container_rootfs(
    work: &Path,
    tools: &Tools,
    hidden: Result<bool, ContainerError>,
) -> Result<Rootfs, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("crun containers need root".into());
    }
    tools.crun.as_ref().ok_or("crun is not installed")?;
    hidden.map_err(|e| error_chain(&e))?;
    Rootfs::create(work, tools).map_err(|e| error_chain(&e))
}

/// The cpu, disk and net steps: host variants here, VM variants from one guest pass per VMM.
/// The fs step boots passes of its own, so that a VMM whose file sharing hangs loses only
/// the fs rows.
fn guest_steps(
    ctx: &Ctx,
    steps: &[Step],
    notes: &mut Vec<String>,
) -> Result<Vec<Figure>, BenchError> {
    let wanted: Vec<Step> = [Step::Cpu, Step::Disk, Step::Net]
        .into_iter()
        .filter(|s| steps.contains(s))
        .collect();
    let mut figures = Vec::new();
    if !wanted.is_empty() {
        let disk = ctx.work.join("disk.img");
        workloads::make_disk_file(&disk)
            .map_err(|e| BenchError::Io(disk.display().to_string(), e))?;
        if wanted.contains(&Step::Cpu) {
            figures.extend(workloads::cpu(ctx)?);
        }
        if wanted.contains(&Step::Disk) {
            figures.extend(workloads::disk(ctx, &disk)?);
        }
        if wanted.contains(&Step::Net) {
            figures.extend(workloads::net(ctx)?);
        }
        let disks = guest::Disks {
            data: Some(&disk),
            fs: None,
        };
        notes.extend(guest::add_vm_rows(ctx, &wanted, &disks, &mut figures)?);
    }
    if steps.contains(&Step::Fs) {
        progress("fs: writing 5 000 small files as a tar and a 256 MiB file");
        let data = fs::FsData::create(&ctx.work).map_err(|e| error_chain(&e));
        let mut fs_figures = fs::host(ctx, &data)?;
        let disks = guest::Disks {
            data: None,
            fs: data.as_ref().ok(),
        };
        let fs_notes = guest::add_vm_rows(ctx, &[Step::Fs], &disks, &mut fs_figures)?;
        if wanted.is_empty() {
            notes.extend(fs_notes);
        }
        figures.extend(fs_figures);
    }
    Ok(figures)
}

/// rvmm's own cost against QEMU's, from the tiny-guest start figures.
fn vmm_note(figures: &[Figure]) -> Option<String> {
    let get = |id: &str, v: Variant| {
        figures
            .iter()
            .find(|f| f.id == id)?
            .summary(v)
            .map(|s| s.median)
    };
    let wall = get("start.exit", Variant::Rvmm)? / get("start.exit", Variant::Qemu)?;
    let cpu = get("start.cpu", Variant::Rvmm)? / get("start.cpu", Variant::Qemu)?;
    let rss = get("start.peak_rss", Variant::Rvmm)?;
    Some(format!(
        "VMM cost alone (tiny guest, 128 MiB): rvmm takes {wall:.2}× QEMU's exec-to-exit time \
         (goal ≤ 0.2×) and {cpu:.2}× its CPU time; rvmm's peak RSS is {rss:.2} MiB (goal ≤ 5 MiB), \
         QEMU's {:.1} MiB.",
        get("start.peak_rss", Variant::Qemu)?
    ))
}

/// How peak RSS is measured, when it was.
fn rss_note(figures: &[Figure], bench_mib: f64) -> Option<String> {
    figures.iter().find(|f| f.id == "start.peak_rss")?;
    Some(format!(
        "Peak RSS is each command's own: a launcher without libc (a few pages) starts it and \
         reads wait4's ru_maxrss. Linux carries a parent's RSS high-water mark into its child \
         across fork and exec, so a command started by the bench itself would report at least \
         the bench's own peak, {bench_mib:.2} MiB."
    ))
}

fn write_report(out: &Path, report: Report) -> Result<(), BenchError> {
    let mut charts = Vec::new();
    for fig in &report.figures {
        let file = format!("{}.svg", fig.id);
        if chart::draw(fig, &out.join(&file))? {
            charts.push((fig.title.clone(), file));
        }
    }
    report.write_json(&out.join("report.json"))?;
    report.write_markdown(&out.join("report.md"), &charts)?;
    progress(&format!(
        "report written to {}",
        out.join("report.md").display()
    ));
    Ok(())
}
