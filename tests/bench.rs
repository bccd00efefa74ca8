//! `rvmm bench --runs 1` end to end, with the steps that run in a few minutes (start, memory,
//! cpu; the cpu step boots the Linux guest once under rvmm and once under QEMU): the JSON
//! holds every raw sample, the Markdown table shows the medians and ratios of exactly those
//! samples, skipped rows say why, and the charts are well-formed SVG. Needs root (crun
//! containers, the bench's mount namespace) and /dev/kvm.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use common::{linux_kvm_or_skip, TestResult};

const TEST: &str = "bench_report_holds_the_measured_samples";
const VARIANTS: [(&str, &str); 4] = [
    ("process", "process"),
    ("container", "crun container"),
    ("rvmm", "rvmm microVM"),
    ("qemu", "QEMU microvm"),
];

fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{TEST}: needs root (crun containers) but RVMM_REQUIRE_KVM=1");
    }
    eprintln!("SKIPPED {TEST}: needs root for crun containers");
    false
}

/// The report's number format: three significant digits.
fn number(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 => format!("{v:.2}"),
        a if a > 0.0 => format!("{v:.*}", (2 - a.log10().floor() as i32).max(3) as usize),
        _ => format!("{v}"),
    }
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The table row of `title`, split into its cells.
fn table_row<'a>(md: &'a str, title: &str) -> TestResult<Vec<&'a str>> {
    let line = md
        .lines()
        .find(|l| l.starts_with(&format!("| {title} |")))
        .ok_or_else(|| format!("report.md has no row for {title:?}"))?;
    Ok(line.trim_matches('|').split('|').map(str::trim).collect())
}

/// The numbered reasons under "## Skipped".
fn skip_list(md: &str) -> Vec<String> {
    md.split("## Skipped")
        .nth(1)
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.split_once(". ").map(|(_, r)| r.to_string()))
        .take_while(|r| !r.starts_with('#'))
        .collect()
}

fn samples_of(row: &Value) -> Option<Vec<f64>> {
    let list = row["samples"]["samples"].as_array()?;
    Some(list.iter().filter_map(Value::as_f64).collect())
}

/// One figure: JSON samples against their summary, and the table cell against both.
fn check_figure(fig: &Value, md: &str, skips: &[String]) -> TestResult<usize> {
    let id = fig["id"].as_str().ok_or("a figure without an id")?;
    let title = fig["title"].as_str().ok_or("a figure without a title")?;
    let cells = table_row(md, title)?;
    let rows = fig["rows"].as_array().ok_or("a figure without rows")?;
    let native = rows
        .iter()
        .find(|r| r["variant"] == "process")
        .and_then(samples_of)
        .map(|s| median(&s));
    let mut measured = 0;
    for (i, (variant, _)) in VARIANTS.iter().enumerate() {
        let row = rows
            .iter()
            .find(|r| r["variant"] == *variant)
            .ok_or_else(|| format!("{id}: no {variant} row"))?;
        let cell = cells[3 + i];
        if let Some(samples) = samples_of(row) {
            if samples.len() != 1 || samples.iter().any(|s| !s.is_finite() || *s <= 0.0) {
                return Err(format!(
                    "{id} {variant}: want one positive sample: {samples:?}"
                ));
            }
            let m = median(&samples);
            let summary = &row["samples"]["summary"];
            if summary["median"].as_f64() != Some(m) {
                return Err(format!("{id} {variant}: JSON median {summary} is not {m}"));
            }
            let ratio = native
                .map(|n| format!("{} · ", number(m / n)))
                .unwrap_or_default();
            let want = format!("{ratio}{} [{}–{}]", number(m), number(m), number(m));
            if cell != want {
                return Err(format!(
                    "{id} {variant}: cell {cell:?}, samples say {want:?}"
                ));
            }
            measured += 1;
        } else {
            let reason = row["skipped"]["reason"]
                .as_str()
                .filter(|r| !r.trim().is_empty())
                .ok_or_else(|| format!("{id} {variant}: neither samples nor a reason: {row}"))?;
            let mark = skips.iter().position(|r| r == reason).map(|p| p + 1);
            if mark.map(|m| format!("skipped ({m})")).as_deref() != Some(cell) {
                return Err(format!("{id} {variant}: cell {cell:?} for skip {reason:?}"));
            }
        }
    }
    Ok(measured)
}

fn check_svg(path: &Path) -> TestResult {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let doc = roxmltree::Document::parse(&text)
        .map_err(|e| format!("{} is not well-formed XML: {e}", path.display()))?;
    if doc.root_element().tag_name().name() != "svg" {
        return Err(format!("{} is not an SVG document", path.display()));
    }
    Ok(())
}

fn reason_of(report: &Value, id: &str, variant: &str) -> String {
    report["figures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["id"] == id)
        .flat_map(|f| f["rows"].as_array().into_iter().flatten())
        .find(|r| r["variant"] == variant)
        .and_then(|r| r["skipped"]["reason"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn bench_report_holds_the_measured_samples() -> TestResult {
    if !root_or_skip() || !linux_kvm_or_skip(TEST) {
        return Ok(());
    }
    let out = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/rvmm-bench-test-")
        .map_err(|e| format!("temporary directory: {e}"))?;
    let dir = out.as_path();
    let run = Command::new(env!("CARGO_BIN_EXE_rvmm"))
        .args([
            "bench",
            "--runs",
            "1",
            "--only",
            "start,memory,cpu",
            "--out",
        ])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run rvmm bench: {e}"))?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    if !run.status.success() {
        return Err(format!("rvmm bench failed ({}):\n{stderr}", run.status));
    }
    for step in [
        "start: process",
        "memory: rvmm microVM",
        "cpu: process",
        "guest steps: rvmm microVM Linux guest",
    ] {
        if !stderr.contains(&format!("rvmm bench: {step}")) {
            return Err(format!("no progress line for {step:?}:\n{stderr}"));
        }
    }
    let md = std::fs::read_to_string(dir.join("report.md")).map_err(|e| e.to_string())?;
    let json = std::fs::read_to_string(dir.join("report.json")).map_err(|e| e.to_string())?;
    let report: Value = serde_json::from_str(&json).map_err(|e| format!("report.json: {e}"))?;
    if report["runs"] != 1 || report["machine"]["cores"].as_u64().unwrap_or(0) == 0 {
        return Err(format!("report.json header: {}", report["machine"]));
    }
    let figures = report["figures"].as_array().ok_or("no figures")?;
    let skips = skip_list(&md);
    let mut measured = 0;
    for fig in figures {
        let count = check_figure(fig, &md, &skips)?;
        let id = fig["id"].as_str().unwrap_or_default();
        let svg = dir.join(format!("{id}.svg"));
        if count > 0 {
            check_svg(&svg)?;
            if !md.contains(&format!("({id}.svg)")) {
                return Err(format!("report.md does not link {id}.svg"));
            }
        }
        measured += count;
    }
    eprintln!(
        "{TEST}: {} figures, {measured} measured rows",
        figures.len()
    );
    // What must have been measured on any host with KVM and root.
    for (id, variant) in [
        ("start.exit", "process"),
        ("start.exit", "container"),
        ("start.exit", "rvmm"),
        ("start.peak_rss", "rvmm"),
        ("memory.pss", "rvmm"),
        ("memory.pss", "container"),
        ("memory.guest", "rvmm"),
        ("cpu.matmul", "process"),
        ("cpu.matmul", "container"),
    ] {
        if median_of(&report, id, variant).is_none() {
            return Err(format!("{id} has no {variant} samples:\n{md}"));
        }
    }
    check_peak_rss(&report)?;
    check_guest_rows(&report, &md)
}

fn median_of(report: &Value, id: &str, variant: &str) -> Option<f64> {
    report["figures"]
        .as_array()?
        .iter()
        .filter(|f| f["id"] == id)
        .flat_map(|f| f["rows"].as_array().into_iter().flatten())
        .find(|r| r["variant"] == variant)
        .and_then(samples_of)
        .map(|s| median(&s))
}

/// Peak RSS is each command's own, not the bench's that a child inherits across fork+exec:
/// the static C agent peaks well under 1 MiB, below the bench's own peak, and rvmm above it.
fn check_peak_rss(report: &Value) -> TestResult {
    let bench = report["bench_peak_rss_mib"]
        .as_f64()
        .ok_or("report.json has no bench_peak_rss_mib")?;
    let process = median_of(report, "start.peak_rss", "process").ok_or("no process peak RSS")?;
    let rvmm = median_of(report, "start.peak_rss", "rvmm").ok_or("no rvmm peak RSS")?;
    if !(process < 1.0 && process < bench && rvmm > process) {
        return Err(format!(
            "peak RSS: process {process} MiB, rvmm {rvmm} MiB, the bench itself {bench} MiB"
        ));
    }
    Ok(())
}

/// The guest pass ran under both VMMs with the kernel whose userspace runs here, and its
/// cpu figure is a real measurement: positive and no faster than the same code on the host.
fn check_guest_rows(report: &Value, md: &str) -> TestResult {
    let Some(dir) = common::guest_artifacts(TEST) else {
        return Ok(());
    };
    let kernel = "vmlinux";
    if !dir.join(kernel).is_file() {
        return Err(format!("no {kernel} in {}", dir.display()));
    }
    if !md.contains(&format!("boot `{kernel}`")) {
        return Err(format!(
            "report.md does not name the guest kernel {kernel}:\n{md}"
        ));
    }
    if !md.contains("A guest system call (getppid) took") {
        return Err(format!("report.md gives no guest system-call time:\n{md}"));
    }
    let native = median_of(report, "cpu.matmul", "process").ok_or("no native cpu figure")?;
    for variant in ["rvmm", "qemu"] {
        let why = reason_of(report, "cpu.matmul", variant);
        if variant == "qemu" && why == "qemu-system-x86_64 is not installed" {
            continue;
        }
        let guest = median_of(report, "cpu.matmul", variant)
            .ok_or_else(|| format!("cpu.matmul {variant}: no guest samples: {why:?}"))?;
        if guest > 2.0 * native {
            return Err(format!(
                "cpu.matmul {variant}: {guest} MFLOP/s in the guest against {native} natively"
            ));
        }
    }
    Ok(())
}
