//! What every step shares: the steps, the context they run in, and their commands.

use std::path::{Path, PathBuf};
use std::process::Command;

use rvmm_vmm::error_chain;

use super::container::{Bundle, Rootfs, Spec};
use super::tools::Tools;

/// One part of the bench, with its own figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Start,
    Memory,
    Cpu,
    Disk,
    Net,
    Fs,
    Runtime,
    Run,
}

impl Step {
    /// Every step, in the order they run.
    pub const ALL: [Step; 8] = [
        Step::Start,
        Step::Memory,
        Step::Cpu,
        Step::Disk,
        Step::Net,
        Step::Fs,
        Step::Runtime,
        Step::Run,
    ];
}

/// Everything a step needs: the built tools and what is available on this host.
pub struct Ctx {
    pub runs: u32,
    pub work: PathBuf,
    pub tools: Tools,
    /// The container rootfs, or why containers cannot run here.
    pub rootfs: Result<Rootfs, String>,
    /// Ok when VMs can run, or why not.
    pub kvm: Result<(), String>,
    pub emulated: bool,
}

impl Ctx {
    pub fn container_ok(&self) -> Result<(), String> {
        self.rootfs.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// `crun run` of a fresh bundle running `args`.
    pub fn container(
        &self,
        args: &[&str],
        bind: Option<(&Path, &str)>,
        netns: Option<&str>,
    ) -> Result<Prepared, String> {
        let rootfs = self.rootfs.as_ref().map_err(Clone::clone)?;
        let crun = self.tools.crun.as_ref().ok_or("crun is not installed")?;
        let bundle = Bundle::create(&self.work, rootfs, crun, &Spec { args, bind, netns })
            .map_err(|e| error_chain(&e))?;
        Ok(Prepared {
            cmd: bundle.command(),
            _bundle: Some(bundle),
            any_status: false,
        })
    }
}

/// A progress line on stderr.
pub fn progress(msg: &str) {
    eprintln!("rvmm bench: {msg}");
}

/// A ready-to-run command for one variant; keeps its container bundle alive.
pub struct Prepared {
    pub cmd: Command,
    pub _bundle: Option<Bundle>,
    /// QEMU's isa-debug-exit makes even a clean end a non-zero status.
    pub any_status: bool,
}
