//! The fs step: extract a tar of 5 000 small files (then sync) and read a 256 MiB file, on the
//! host's own file system and, in the guest pass (guest.rs), through virtio-fs (virtiofsd on a
//! host directory) and through virtio-blk (an ext4 image), under rvmm and under QEMU with the
//! same virtiofsd and the same options.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::ctx::{progress, Ctx};
use super::report::{Better, Figure, Variant};
use super::runner::{field, run, Group, RunError, Watch};
use super::start::{fail_reason, record};

/// The virtio-fs tag the guest agent mounts.
pub const TAG: &str = "benchfs";
const DIRS: usize = 50;
const FILES_PER_DIR: usize = 100;
const FILES: usize = DIRS * FILES_PER_DIR;
/// Small files: 64 B to ~4 KiB, the size of most files in an image layer.
const MAX_FILE_BYTES: usize = 4096;
const BIG_MIB: usize = 256;
/// Room for the tar, the big file, the extracted tree and ext4's own metadata.
const DISK_MIB: usize = 512;
const TIMEOUT: Duration = Duration::from_secs(300);
/// Where distributions install virtiofsd: the Rust one, then QEMU's C one (Debian 12).
const VIRTIOFSD_PATHS: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
const VIRTIOFSD_START: Duration = Duration::from_secs(10);

/// The figures of the step: (id, title, the agent line's key, unit, better).
const FIGURES: [(&str, &str, &str, &str, Better); 4] = [
    (
        "fs.untar_virtiofs",
        "fs: extract 5 000 small files and sync — virtio-fs (host: its own disk)",
        "untar_s=",
        "s",
        Better::Lower,
    ),
    (
        "fs.read_virtiofs",
        "fs: read a 256 MiB file — virtio-fs (host: its own disk)",
        "read_mibs=",
        "MiB/s",
        Better::Higher,
    ),
    (
        "fs.untar_blk",
        "fs: extract 5 000 small files and sync — ext4 on virtio-blk (host: its own disk)",
        "untar_s=",
        "s",
        Better::Lower,
    ),
    (
        "fs.read_blk",
        "fs: read a 256 MiB file — ext4 on virtio-blk (host: its own disk)",
        "read_mibs=",
        "MiB/s",
        Better::Higher,
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("cannot write the fs step's files in {0}")]
    Write(String, #[source] std::io::Error),
    #[error("{0} failed: {1}")]
    Tool(&'static str, String),
}

/// The step's data: a directory (shared over virtio-fs, and the host's own run) holding
/// tree.tar and big, and an ext4 image made from it for virtio-blk.
pub struct FsData {
    pub share: PathBuf,
    pub disk: PathBuf,
}

impl FsData {
    pub fn create(work: &Path) -> Result<FsData, FsError> {
        let share = work.join("fs-share");
        let tree = work.join("fs-tree");
        let e = |p: &Path| {
            let p = p.display().to_string();
            move |err| FsError::Write(p, err)
        };
        write_tree(&tree).map_err(e(&tree))?;
        std::fs::create_dir_all(&share).map_err(e(&share))?;
        let tar = share.join("tree.tar");
        tool(
            "tar",
            Command::new("tar")
                .arg("--format=ustar")
                .arg("-C")
                .arg(&tree)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        )?;
        std::fs::remove_dir_all(&tree).map_err(e(&tree))?;
        super::workloads::write_random(&share.join("big"), BIG_MIB).map_err(e(&share))?;
        Ok(FsData {
            disk: work.join("fs-disk.ext4"),
            share,
        })
    }

    /// Removes what an earlier run extracted.
    pub fn clear(&self) -> Result<(), FsError> {
        let untar = self.share.join("untar");
        match std::fs::remove_dir_all(&untar) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(FsError::Write(untar.display().to_string(), e))
            }
            _ => Ok(()),
        }
    }

    /// A fresh share and a fresh ext4 image (with a journal, as a guest's own disk has) of
    /// the same two files, for one guest pass.
    pub fn reset(&self) -> Result<(), FsError> {
        self.clear()?;
        let _ = std::fs::remove_file(&self.disk);
        tool(
            "mkfs.ext4",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "rvmm-bench-fs", "-d"])
                .arg(&self.share)
                .arg(&self.disk)
                .arg(format!("{DISK_MIB}M")),
        )
    }
}

fn tool(name: &'static str, cmd: &mut Command) -> Result<(), FsError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| FsError::Tool(name, e.to_string()))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(FsError::Tool(name, format!("{}: {said}", out.status)));
    }
    Ok(())
}

/// DIRS directories of FILES_PER_DIR files of pseudo-random sizes and bytes.
fn write_tree(tree: &Path) -> std::io::Result<()> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut bytes = vec![0u8; MAX_FILE_BYTES];
    for d in 0..DIRS {
        let dir = tree.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..FILES_PER_DIR {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 64 + (x % (MAX_FILE_BYTES as u64 - 64)) as usize;
            bytes.iter_mut().take(len).for_each(|b| *b = (x >> 3) as u8);
            std::fs::File::create(dir.join(format!("f{f:03}")))?.write_all(&bytes[..len])?;
        }
    }
    Ok(())
}

/// The step's figures with the host's rows; guest.rs adds the rvmm and QEMU rows.
pub fn host(ctx: &Ctx, data: &Result<FsData, String>) -> Result<Vec<Figure>, RunError> {
    let mut figs: [Figure; 4] =
        FIGURES.map(|(id, title, _, unit, better)| Figure::new(id, title, unit, better));
    progress("fs: process on the host's file system");
    let mut samples: [Vec<f64>; 4] = Default::default();
    let outcome = data.as_ref().map_err(Clone::clone).and_then(|data| {
        (0..ctx.runs).try_for_each(|_| {
            data.clear().map_err(|e| rvmm_vmm::error_chain(&e))?;
            let mut cmd = Command::new(&ctx.tools.agent);
            cmd.arg("fs").arg(&data.share);
            let m = run(&mut cmd, Watch::new("agent fs", TIMEOUT, "")).map_err(fail_reason)?;
            let values = parse(&m.stdout, "fs")
                .ok_or_else(|| format!("agent fs: unexpected output: {}", m.stdout.trim()))?;
            // The host has one file system: its figures stand in both comparisons.
            for (s, v) in samples.iter_mut().zip([values, values].concat()) {
                s.push(v);
            }
            Ok(())
        })
    });
    record(&mut figs, Variant::Process, outcome, samples)?;
    for fig in &mut figs {
        fig.skipped(
            Variant::Container,
            "not measured: a container's volume is a bind mount of the host's own file system",
        );
    }
    Ok(figs.into())
}

/// (untar seconds, read MiB/s) from the agent's `RVMM-BENCH LABEL ...` line, if it extracted
/// every file.
fn parse(out: &str, label: &str) -> Option<[f64; 2]> {
    let prefix = format!("RVMM-BENCH {label} ");
    let line = out.lines().find_map(|l| Some(&l[l.find(&prefix)?..]))?;
    if field(line, "files=")? != FILES as f64 {
        return None;
    }
    Some([field(line, FIGURES[0].2)?, field(line, FIGURES[1].2)?])
}

/// The fs figures' values in a guest pass's console, by figure id.
pub fn guest_values(console: &str) -> Vec<(&'static str, f64)> {
    let mut values = Vec::new();
    for (label, ids) in [("fs-virtiofs", 0..2), ("fs-blk", 2..4)] {
        if let Some(v) = parse(console, label) {
            values.extend(FIGURES[ids].iter().map(|f| f.0).zip(v));
        }
    }
    values
}

/// What a guest printed instead of a result, for a skip reason.
pub fn guest_error(console: &str) -> Option<String> {
    let line = console
        .lines()
        .find(|l| l.contains(" error=") && l.contains("RVMM-BENCH fs-"))?;
    Some(line[line.find("RVMM-BENCH ")? + 11..].trim().to_string())
}

/// A virtiofsd for QEMU's pass, with the options rvmm gives its own; killed on drop.
pub struct QemuVirtiofsd {
    _group: Group,
    pub socket: PathBuf,
}

impl QemuVirtiofsd {
    pub fn start(work: &Path, data: &FsData) -> Result<QemuVirtiofsd, String> {
        let path = VIRTIOFSD_PATHS
            .iter()
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| format!("virtiofsd is installed at none of {VIRTIOFSD_PATHS:?}"))?;
        let socket = work.join("qemu-virtiofsd.sock");
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(path);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", data.share.display()))
            .args(["-o", "log_level=warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let group = Group::spawn(&mut cmd, "virtiofsd").map_err(fail_reason)?;
        let deadline = Instant::now() + VIRTIOFSD_START;
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "virtiofsd did not listen within {VIRTIOFSD_START:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(QemuVirtiofsd {
            _group: group,
            socket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_agents_lines() {
        let console = "noise\nRVMM-BENCH fs-virtiofs untar_s=12.500 files=5000 read_mibs=310.2\n\
                       RVMM-BENCH fs-blk untar_s=0.750 files=5000 read_mibs=1200.0\n";
        assert_eq!(
            guest_values(console),
            [
                ("fs.untar_virtiofs", 12.5),
                ("fs.read_virtiofs", 310.2),
                ("fs.untar_blk", 0.75),
                ("fs.read_blk", 1200.0)
            ]
        );
        assert_eq!(guest_error(console), None);
        let short = "RVMM-BENCH fs untar_s=1.0 files=4999 read_mibs=9.0\n";
        assert_eq!(parse(short, "fs"), None, "a missing file is no result");
        let failed = "RVMM-BENCH fs-virtiofs error=No such device\nRVMM-BENCH fs-blk error=no \
                      ext4 disk\n";
        assert!(guest_values(failed).is_empty());
        assert_eq!(
            guest_error(failed).as_deref(),
            Some("fs-virtiofs error=No such device")
        );
    }

    #[test]
    fn the_data_holds_the_tree_and_the_big_file() {
        let work = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let data = FsData::create(work.as_path()).unwrap();
        let tar = std::fs::metadata(data.share.join("tree.tar"))
            .unwrap()
            .len();
        assert!(tar > (FILES * 512) as u64, "{tar}");
        let big = std::fs::metadata(data.share.join("big")).unwrap().len();
        assert_eq!(big, (BIG_MIB << 20) as u64);
        assert!(!work.as_path().join("fs-tree").exists());
    }
}
