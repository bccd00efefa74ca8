//! Memory of a process tree from /proc: PSS and RSS summed over the processes, and the
//! resident part of the guest RAM mapping of a VMM.

use std::collections::HashMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemSample {
    pub pss_kib: u64,
    pub rss_kib: u64,
    /// Rss of the mapping at least `guest_kib` large (a VMM's guest RAM), 0 when none.
    pub guest_kib: u64,
}

/// `pid` and its descendants, summed.
pub fn tree(pid: u32, guest_kib: u64) -> MemSample {
    let mut sample = MemSample::default();
    for p in descendants(pid) {
        let rollup = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
        sample.pss_kib += kib_field(&rollup, "Pss:");
        sample.rss_kib += kib_field(&rollup, "Rss:");
        let smaps = std::fs::read_to_string(format!("/proc/{p}/smaps")).unwrap_or_default();
        sample.guest_kib += guest_rss(&smaps, guest_kib);
    }
    sample
}

/// Every process now: pid → parent pid.
pub fn parents() -> HashMap<u32, u32> {
    let mut parent = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if let Some(ppid) = ppid(&stat) {
            parent.insert(pid, ppid);
        }
    }
    parent
}

/// `root` and every process whose parent chain leads to it.
fn descendants(root: u32) -> Vec<u32> {
    let parent = parents();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// The 4th field of /proc/PID/stat, after the parenthesised command name.
fn ppid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// This process's peak RSS (VmHWM).
pub fn own_peak_kib() -> u64 {
    kib_field(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
        "VmHWM:",
    )
}

/// The number after `name` on its line, e.g. `Pss:` in /proc/PID/smaps_rollup (kB).
pub fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Rss of the smallest mapping whose size is at least `guest_kib`: the guest RAM.
fn guest_rss(smaps: &str, guest_kib: u64) -> u64 {
    let mut best: Option<(u64, u64)> = None;
    let mut size = 0;
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Size:") {
            size = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let rss = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if size >= guest_kib && best.is_none_or(|(s, _)| size < s) {
                best = Some((size, rss));
            }
        }
    }
    best.map_or(0, |(_, rss)| rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ppid_after_a_command_with_spaces() {
        assert_eq!(ppid("42 (a b) c) S 7 42 42 0"), Some(7));
        assert_eq!(ppid("garbage"), None);
    }

    #[test]
    fn picks_the_guest_ram_mapping() {
        let smaps = "7f00-7f01 rw-p 0 00:00 0\nSize: 4 kB\nRss: 4 kB\n\
                     7e00-7f00 rw-p 0 00:00 0\nSize: 131072 kB\nRss: 120 kB\n\
                     7d00-7e00 rw-p 0 00:00 0\nSize: 262144 kB\nRss: 900 kB\n";
        assert_eq!(guest_rss(smaps, 131072), 120);
        assert_eq!(guest_rss(smaps, 1 << 30), 0);
        assert_eq!(kib_field("Rss: 12 kB\nPss: 7 kB\n", "Pss:"), 7);
    }

    #[test]
    fn sums_our_own_process() {
        let s = tree(std::process::id(), 1 << 40);
        assert!(s.rss_kib > 0 && s.pss_kib > 0 && s.guest_kib == 0, "{s:?}");
        assert!(own_peak_kib() > 0);
    }
}
