//! Guest RAM backings side by side: private anonymous mappings (the default) against the one
//! sealed memfd mapped shared that a vhost-user backend (`--fs`, `--share`) needs. Each round
//! creates a guest's memory the way `Vmm::build` does, writes one byte to every page of the
//! first `TOUCHED` bytes (a guest's first touch faults each page in the same way) and measures
//! the time of both steps and the process's resident growth. Rounds alternate between the two
//! backings; medians are reported.
//!
//! Run: `cargo bench -p rvmm-vmm --bench memory`; the table also goes to `RVMM_BENCH_OUT`
//! (default: `<target dir>/bench-memory.md`).

#[path = "../../devices/benches/common/report.rs"]
mod report;

use std::time::Instant;

use rvmm_vmm::vstate::memory::{create_guest_memory, MemoryBacking};
use vm_memory::{Bytes, GuestAddress};

const GUEST: u64 = 512 << 20;
const TOUCHED: u64 = 256 << 20;
const PAGE: u64 = 4096;
const ROUNDS: usize = 7;

/// VmRSS in KiB (anonymous and shared-memory pages alike).
fn rss_kib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Create ms, touch ms, RSS growth MiB of one round.
fn round(backing: MemoryBacking) -> (f64, f64, f64) {
    let before = rss_kib();
    let start = Instant::now();
    let mem = create_guest_memory(GUEST, backing).expect("guest memory");
    let created = start.elapsed();
    let start = Instant::now();
    for page in (0..TOUCHED).step_by(PAGE as usize) {
        mem.write_obj(1u8, GuestAddress(page)).expect("write");
    }
    let touched = start.elapsed();
    let grown = (rss_kib() - before) / 1024.0;
    drop(mem);
    (
        created.as_secs_f64() * 1e3,
        touched.as_secs_f64() * 1e3,
        grown,
    )
}

fn main() -> std::io::Result<()> {
    if !report::requested("memory") {
        return Ok(());
    }
    let backings = [
        ("anonymous (default)", MemoryBacking::Anonymous),
        ("sealed memfd, shared (--fs/--share)", MemoryBacking::Shared),
    ];
    let mut samples = vec![(Vec::new(), Vec::new(), Vec::new()); backings.len()];
    for _ in 0..ROUNDS {
        for (i, (_, backing)) in backings.iter().enumerate() {
            let (c, t, r) = round(*backing);
            samples[i].0.push(c);
            samples[i].1.push(t);
            samples[i].2.push(r);
        }
    }
    let mut table = format!(
        "# Guest RAM backings: {} MiB guest, first write to {} MiB\n\n{}\n\n\
         | backing | create (ms) | first touch (ms) | touch per page (µs) | RSS growth (MiB) |\n\
         |---|---|---|---|---|\n",
        GUEST >> 20,
        TOUCHED >> 20,
        report::host_line()
    );
    let mut touch = Vec::new();
    for ((name, _), (c, t, r)) in backings.iter().zip(samples) {
        let t = report::median(t);
        touch.push(t);
        table += &format!(
            "| {name} | {:.3} | {t:.1} | {:.2} | {:.0} |\n",
            report::median(c),
            t * 1e3 / (TOUCHED / PAGE) as f64,
            report::median(r)
        );
    }
    table += &format!(
        "\nfirst touch, memfd / anonymous: {:.2}×\n",
        touch[1] / touch[0]
    );
    report::publish("memory", &table)
}
