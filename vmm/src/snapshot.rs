//! Snapshots of a paused VM, in a directory of three files:
//! - `memory`: guest RAM, its regions one after another, with holes where pages are zero
//!   (never touched, or given back by the balloon);
//! - `state.json`: the format version, the rvmm version and host CPU that made it, the VM's
//!   configuration, the kvmclock, every vCPU's state and every device's;
//! - `state.sha256`: the SHA-256 of `state.json`, written last, so that a snapshot cut short
//!   or altered is refused.
//!
//! A restore maps `memory` privately: pages are read from the file when the guest first
//! touches them, and what the guest writes stays in its own copy.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rvmm_devices::legacy::ioapic::IoApicSnapshot;
use rvmm_devices::legacy::serial::SerialSnapshot;
use rvmm_devices::virtio::mmio::MmioState;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::config::{ConfigError, NetBackend, VmConfig};
use crate::vstate::vcpu_state::VcpuState;

/// Bumped whenever what `state.json` holds changes meaning.
pub const FORMAT: u32 = 1;
const STATE: &str = "state.json";
const MEMORY: &str = "memory";
const CHECKSUM: &str = "state.sha256";
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("snapshot {0}: not a complete rvmm snapshot (no {CHECKSUM})")]
    Incomplete(String),
    #[error("snapshot {0}: its state does not match its checksum")]
    Checksum(String),
    #[error("snapshot {path}: unreadable state")]
    Format {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("snapshot {path}: {what} is {theirs}, here it is {ours}")]
    Foreign {
        path: String,
        what: &'static str,
        theirs: String,
        ours: String,
    },
    #[error("snapshot {path}: its memory file has {found} bytes, the VM {expected}")]
    MemorySize {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("snapshot {0}: cannot map its memory")]
    Map(String),
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub header: Header,
    pub config: VmConfig,
    /// kvmclock's value (ns) when the snapshot was taken.
    pub clock_ns: u64,
    pub vcpus: Vec<VcpuState>,
    pub ioapic: IoApicSnapshot,
    pub serial: Option<SerialSnapshot>,
    /// In slot order.
    pub virtio: Vec<MmioState>,
}

/// What must match for a restore: checked before the rest is read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub rvmm: String,
    pub cpu: String,
}

impl Header {
    /// This rvmm on this host.
    pub fn here() -> Self {
        Header {
            format: FORMAT,
            rvmm: env!("CARGO_PKG_VERSION").to_string(),
            cpu: host_cpu(),
        }
    }
}

/// The host CPU's vendor and signature (family, model, stepping), as CPUID gives them: a vCPU
/// state is only known to load on the CPU model it was saved on.
fn host_cpu() -> String {
    let vendor = std::arch::x86_64::__cpuid(0);
    let signature = std::arch::x86_64::__cpuid(1).eax;
    let bytes: Vec<u8> = [vendor.ebx, vendor.edx, vendor.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    format!("{} {signature:#x}", String::from_utf8_lossy(&bytes))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `state` and guest memory into `dir` (made if missing; files in it are replaced).
/// `pagemap`, this process's `/proc/self/pagemap` (opened before a jail hid `/proc`), lets
/// the pages of anonymous memory the guest never touched go unread.
pub fn write(
    dir: &Path,
    state: &VmState,
    mem: &GuestMemoryMmap,
    pagemap: Option<&File>,
) -> Result<(), SnapshotError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    // An old checksum would vouch for a half-written new state.
    match fs::remove_file(dir.join(CHECKSUM)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(dir)(e)),
        _ => {}
    }
    // Into a new file renamed over the old: a VM restored from this very directory reads its
    // memory from the old one.
    let fresh = dir.join(format!("{MEMORY}.new"));
    write_memory(&fresh, mem, pagemap)?;
    fs::rename(&fresh, dir.join(MEMORY)).map_err(io_err(dir))?;
    let text = serde_json::to_vec(state).map_err(|source| SnapshotError::Format {
        path: dir.display().to_string(),
        source,
    })?;
    write_synced(&dir.join(STATE), &text)?;
    write_synced(&dir.join(CHECKSUM), hex_digest(&text).as_bytes())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut file = File::create(path).map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// Each region after the other; runs of zero pages stay holes.
fn write_memory(
    path: &Path,
    mem: &GuestMemoryMmap,
    pagemap: Option<&File>,
) -> Result<(), SnapshotError> {
    let file = File::create(path).map_err(io_err(path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(io_err(path))?;
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is mapped for `len` bytes for as long as `mem` lives; the vCPUs
        // and the device thread are stopped, so nothing writes it while it is read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        // A file-backed region (a restored VM's) holds file data in its absent pages.
        let touched = match (pagemap, region.file_offset()) {
            (Some(pagemap), None) => touched_pages(pagemap, region.as_ptr() as usize, len),
            _ => None,
        };
        for (start, end) in nonzero_runs(bytes, touched.as_deref()) {
            file.write_all_at(&bytes[start..end], offset + start as u64)
                .map_err(io_err(path))?;
        }
        offset += len as u64;
    }
    file.sync_all().map_err(io_err(path))
}

/// Whether each page of the anonymous mapping at `addr` is present or swapped out; the others
/// were never written (or were given back) and read as zeros. None where pagemap cannot say.
fn touched_pages(pagemap: &File, addr: usize, len: usize) -> Option<Vec<bool>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pages = len.div_ceil(PAGE);
    let mut entries = vec![0u8; pages * 8];
    let at = (addr / PAGE * 8) as u64;
    if let Err(e) = pagemap.read_exact_at(&mut entries, at) {
        log::debug!("snapshot: cannot read the page map: {e}");
        return None;
    }
    let touched = entries.chunks_exact(8).map(|e| {
        let entry = u64::from_le_bytes(e.try_into().unwrap_or_default());
        entry & (PRESENT | SWAPPED) != 0
    });
    Some(touched.collect())
}

/// (start, end) of each run of pages with a non-zero byte, looking only at `touched` pages
/// where that is known.
fn nonzero_runs(bytes: &[u8], touched: Option<&[bool]>) -> Vec<(usize, usize)> {
    static ZERO: [u8; PAGE] = [0; PAGE];
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        let untouched = touched.is_some_and(|t| !t.get(i).copied().unwrap_or(true));
        // Compared as a whole slice: one memcmp, fast even in a debug build.
        if untouched || page == &ZERO[..page.len()] {
            continue;
        }
        let (start, end) = (i * PAGE, i * PAGE + page.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads and checks a snapshot's state: its checksum, then that this rvmm on this CPU made it.
pub fn read(dir: &Path) -> Result<VmState, SnapshotError> {
    let name = dir.display().to_string();
    let sum = match fs::read_to_string(dir.join(CHECKSUM)) {
        Ok(sum) => sum,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SnapshotError::Incomplete(name))
        }
        Err(e) => return Err(io_err(dir)(e)),
    };
    let path = dir.join(STATE);
    let text = fs::read(&path).map_err(io_err(&path))?;
    if hex_digest(&text) != sum.trim() {
        return Err(SnapshotError::Checksum(name));
    }
    let format_err = |source| SnapshotError::Format {
        path: name.clone(),
        source,
    };
    #[derive(Deserialize)]
    struct HeaderOnly {
        header: Header,
    }
    let theirs = serde_json::from_slice::<HeaderOnly>(&text)
        .map_err(format_err)?
        .header;
    check_header(&name, &theirs, &Header::here())?;
    serde_json::from_slice(&text).map_err(format_err)
}

fn check_header(path: &str, theirs: &Header, ours: &Header) -> Result<(), SnapshotError> {
    let differs = |what, theirs: String, ours: String| SnapshotError::Foreign {
        path: path.to_string(),
        what,
        theirs,
        ours,
    };
    if theirs.format != ours.format {
        let (t, o) = (theirs.format.to_string(), ours.format.to_string());
        return Err(differs("its format", t, o));
    }
    if theirs.rvmm != ours.rvmm {
        return Err(differs(
            "its rvmm version",
            theirs.rvmm.clone(),
            ours.rvmm.clone(),
        ));
    }
    if theirs.cpu != ours.cpu {
        return Err(differs("its CPU", theirs.cpu.clone(), ours.cpu.clone()));
    }
    Ok(())
}

/// What a restore may change in the snapshot's configuration: where the host's resources
/// are, never the guest's hardware.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// (disk index, image): the disks in the guest's order, the root filesystem first.
    pub disks: Vec<(usize, PathBuf)>,
    /// TAP names for the `--net tap=` interfaces, in order.
    pub taps: Vec<String>,
    pub api_socket: Option<PathBuf>,
    pub vsock_uds: Option<PathBuf>,
}

impl RestoreOptions {
    /// The snapshot's configuration with these changes.
    pub fn apply(&self, saved: &VmConfig) -> Result<VmConfig, ConfigError> {
        let mut cfg = saved.clone();
        for (index, path) in &self.disks {
            let count = cfg.disks.len();
            let disk = cfg.disks.get_mut(*index).ok_or_else(|| {
                ConfigError::Restore(format!("--disk {index}=…: the snapshot has {count} disks"))
            })?;
            disk.path = path.clone();
        }
        if !self.taps.is_empty() {
            let mut taps = cfg
                .nets
                .iter_mut()
                .filter_map(|n| match &mut n.backend {
                    NetBackend::Tap(name) => Some(name),
                    NetBackend::User => None,
                })
                .collect::<Vec<_>>();
            if taps.len() != self.taps.len() {
                let msg = format!("--tap: the snapshot has {} TAP interfaces", taps.len());
                return Err(ConfigError::Restore(msg));
            }
            for (name, new) in taps.iter_mut().zip(&self.taps) {
                **name = new.clone();
            }
        }
        if let Some(api) = &self.api_socket {
            cfg.api_socket = Some(api.clone());
        }
        match (&mut cfg.vsock, &self.vsock_uds) {
            (Some(v), Some(uds)) => v.uds = uds.clone(),
            (None, Some(_)) => {
                return Err(ConfigError::Restore(
                    "--vsock-uds: the snapshot has no vsock".into(),
                ))
            }
            _ => {}
        }
        cfg.revalidate()?;
        Ok(cfg)
    }
}

/// Guest memory mapped privately from the snapshot's memory file, with the layout of
/// `ranges` (the VM's RAM regions, which must add up to the file's size).
pub fn map_memory(
    dir: &Path,
    ranges: &[(vm_memory::GuestAddress, usize)],
) -> Result<GuestMemoryMmap, SnapshotError> {
    let path: PathBuf = dir.join(MEMORY);
    let file = std::sync::Arc::new(File::open(&path).map_err(io_err(&path))?);
    let found = file.metadata().map_err(io_err(&path))?.len();
    let expected: u64 = ranges.iter().map(|&(_, len)| len as u64).sum();
    if found != expected {
        return Err(SnapshotError::MemorySize {
            path: dir.display().to_string(),
            found,
            expected,
        });
    }
    let map_err = || SnapshotError::Map(dir.display().to_string());
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|_| map_err())?;
        regions.push(GuestRegionMmap::new(mapping, addr).ok_or_else(map_err)?);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| map_err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_left_out() {
        let mut bytes = vec![0u8; 6 * PAGE + 100];
        bytes[PAGE + 5] = 1;
        bytes[2 * PAGE] = 1;
        bytes[5 * PAGE + 7] = 1;
        bytes[6 * PAGE + 99] = 1;
        assert_eq!(
            nonzero_runs(&bytes, None),
            [(PAGE, 3 * PAGE), (5 * PAGE, 6 * PAGE + 100)]
        );
        assert!(nonzero_runs(&[0; 3 * PAGE], None).is_empty());
        // Pages known untouched are not read.
        let touched = [false, true, false, false, false, true, true];
        assert_eq!(
            nonzero_runs(&bytes, Some(&touched)),
            [(PAGE, 2 * PAGE), (5 * PAGE, 6 * PAGE + 100)]
        );
    }

    #[test]
    fn the_page_map_tells_touched_pages_from_untouched_ones() {
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        // SAFETY: libc::mmap of fresh anonymous memory, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: the mapping is 4 pages long; page 2 is written once.
        unsafe { *addr.cast::<u8>().add(2 * PAGE) = 1 };
        let touched = touched_pages(&pagemap, addr as usize, 4 * PAGE).unwrap();
        assert_eq!(touched, [false, false, true, false]);
        // SAFETY: unmaps the mapping made above, which nothing refers to any more.
        unsafe { libc::munmap(addr, 4 * PAGE) };
    }

    #[test]
    fn a_header_from_elsewhere_is_refused() {
        let ours = Header::here();
        assert!(check_header("s", &ours, &ours).is_ok());
        let older = Header {
            rvmm: "0.0.1".into(),
            ..ours.clone()
        };
        let err = check_header("s", &older, &ours).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "snapshot s: its rvmm version is 0.0.1, here it is {}",
                ours.rvmm
            )
        );
        let other_cpu = Header {
            cpu: "AuthenticAMD 0x1".into(),
            ..ours.clone()
        };
        let err = check_header("s", &other_cpu, &ours)
            .unwrap_err()
            .to_string();
        assert!(err.contains("its CPU is AuthenticAMD 0x1"), "{err}");
        let format = Header {
            format: 99,
            ..ours.clone()
        };
        assert!(check_header("s", &format, &ours).is_err());
    }
}
