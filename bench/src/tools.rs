//! What the steps run: the workload agent, the launcher and the tiny guest, built with cc from
//! sources embedded in rvmm, and the host tools (QEMU, crun, fio, iperf3) found on PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

const AGENT_C: &str = include_str!("../../resources/bench/agent.c");
const TINY_S: &str = include_str!("../../resources/bench/tiny.S");
const LAUNCH_C: &str = include_str!("../../resources/bench/launch.c");
/// Iterations of the tiny guest's loop at CPL0 for the emulation check: ~0.3 s at the
/// emulator's ~1 MIPS, instant on hardware.
pub const SPIN_ITERS: u64 = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot create {0}")]
    Create(String, #[source] std::io::Error),
    #[error("cannot run {0}")]
    Run(String, #[source] std::io::Error),
    #[error("building {0} failed: {1}")]
    Build(String, String),
}

/// A private temporary directory, removed with everything in it on drop.
pub struct WorkDir(PathBuf);

impl WorkDir {
    pub fn create() -> Result<WorkDir, ToolError> {
        let dir = std::env::temp_dir().join(format!("rvmm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| ToolError::Create(dir.display().to_string(), e))?;
        Ok(WorkDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Tools {
    pub rvmm: PathBuf,
    pub agent: PathBuf,
    /// Runs a command and reports its CPU time and its own peak RSS (see launch.c).
    pub launcher: PathBuf,
    /// Prints a line and exits; `tiny_idle` halts after the line, `tiny_spin` loops first.
    pub tiny: PathBuf,
    pub tiny_idle: PathBuf,
    pub tiny_spin: PathBuf,
    pub qemu: Option<PathBuf>,
    pub crun: Option<PathBuf>,
    pub fio: Option<PathBuf>,
    pub iperf3: Option<PathBuf>,
}

impl Tools {
    pub fn build(work: &Path) -> Result<Tools, ToolError> {
        let agent_src = write_source(work, "agent.c", AGENT_C)?;
        let tiny_src = write_source(work, "tiny.S", TINY_S)?;
        let agent = work.join("agent");
        cc(&["-O2", "-static", "-w"], &agent_src, &agent)?;
        let guest_flags = [
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,-N",
            "-Wl,--no-warn-rwx-segments",
            "-Wl,-Ttext=0x200000",
        ];
        let tiny = work.join("tiny.elf");
        cc(&guest_flags, &tiny_src, &tiny)?;
        let tiny_idle = work.join("tiny-idle.elf");
        cc(
            &[&guest_flags[..], &["-DIDLE"]].concat(),
            &tiny_src,
            &tiny_idle,
        )?;
        let tiny_spin = work.join("tiny-spin.elf");
        let spin = format!("-DSPIN={SPIN_ITERS}");
        cc(
            &[&guest_flags[..], &[spin.as_str()]].concat(),
            &tiny_src,
            &tiny_spin,
        )?;
        Ok(Tools {
            rvmm: std::env::current_exe().map_err(|e| ToolError::Run("rvmm".into(), e))?,
            agent,
            launcher: build_launcher(work)?,
            tiny,
            tiny_idle,
            tiny_spin,
            qemu: which("qemu-system-x86_64"),
            crun: which("crun"),
            fio: which("fio"),
            iperf3: which("iperf3"),
        })
    }
}

fn write_source(work: &Path, name: &str, text: &str) -> Result<PathBuf, ToolError> {
    let path = work.join(name);
    std::fs::write(&path, text).map_err(|e| ToolError::Create(path.display().to_string(), e))?;
    Ok(path)
}

/// The launcher, without libc: its own peak RSS, which its child inherits, stays a few pages.
pub fn build_launcher(work: &Path) -> Result<PathBuf, ToolError> {
    let src = write_source(work, "launch.c", LAUNCH_C)?;
    let launcher = work.join("launch");
    let flags = [
        "-O2",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-ffreestanding",
        "-fno-builtin",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-Wl,--build-id=none",
    ];
    cc(&flags, &src, &launcher)?;
    Ok(launcher)
}

fn cc(flags: &[&str], src: &Path, out: &Path) -> Result<(), ToolError> {
    let output = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .map_err(|e| ToolError::Run("cc".into(), e))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        return Err(ToolError::Build(
            out.display().to_string(),
            err.trim().to_string(),
        ));
    }
    Ok(())
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// Copies `bin` to `root/bin/NAME` and the shared libraries ldd lists to the same paths under
/// `root`, so that it runs in a container or guest root holding nothing else.
pub fn install_with_libs(bin: &Path, root: &Path) -> Result<PathBuf, ToolError> {
    let name = bin.file_name().unwrap_or_default();
    let dest = root.join("bin").join(name);
    copy(bin, &dest)?;
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| ToolError::Run("ldd".into(), e))?;
    for lib in ldd_paths(&String::from_utf8_lossy(&out.stdout)) {
        let rel = lib.strip_prefix("/").unwrap_or(&lib);
        copy(&lib, &root.join(rel))?;
    }
    Ok(dest)
}

fn copy(from: &Path, to: &Path) -> Result<(), ToolError> {
    let err = |e| ToolError::Create(to.display().to_string(), e);
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::copy(from, to).map_err(err)?;
    Ok(())
}

/// The absolute library paths in ldd's output ("libx.so => /lib/libx.so (0x…)" and
/// "/lib64/ld-linux-x86-64.so.2 (0x…)").
fn ldd_paths(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 \
                   (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(ldd),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
