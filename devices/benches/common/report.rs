//! What every device-model benchmark does around its measurements: run only under
//! `cargo bench`, describe the host, take medians and publish a Markdown table.

use std::io;
use std::path::PathBuf;

/// `cargo bench` passes `--bench`; a plain `cargo test` run of the benches passes nothing and
/// should stay quick, so the bench then only says it skipped.
pub fn requested(name: &str) -> bool {
    let requested = std::env::args().any(|a| a == "--bench");
    if !requested {
        println!("{name} bench: skipped (run with `cargo bench`)");
    }
    requested
}

/// CPU count and load, since other work on the host skews the numbers.
pub fn host_line() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");
    format!("{cpus} CPUs, 1-minute load average {load} at start")
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prints the table and writes it to `RVMM_BENCH_OUT` (default: `<target dir>/bench-NAME.md`).
pub fn publish(name: &str, table: &str) -> io::Result<()> {
    print!("{table}");
    let path = std::env::var_os("RVMM_BENCH_OUT").map_or_else(
        || {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
                PathBuf::from,
            );
            target.join(format!("bench-{name}.md"))
        },
        PathBuf::from,
    );
    std::fs::write(&path, table)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}
