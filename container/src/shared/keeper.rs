//! The keeper of a shared VM: boots it, holds its agent's first connection and the state
//! lock, and stops it on SIGTERM/SIGINT/SIGHUP (`rvmm vm stop`), or reports how it ended.
//! The VM is the keeper's child (it dies with it); the VM's sockets live in the state
//! directory, so whatever a killed keeper left is removed by the next start.

use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rvmm_agent::protocol::IMAGE_TAG;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::state::{state_base, VmDir, VmRecord};
use super::{SharedError, VmOptions};
use crate::image::disk::DiskCache;
use crate::network;
use crate::vm::{GuestFiles, VmError, VmLaunch, VmProcess};

/// How long the guest may take to power off once asked.
const POWER_OFF_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// Runs the VM until it is stopped; its state directory is gone when this returns.
pub fn keep(opts: &VmOptions) -> Result<(), SharedError> {
    let dir = VmDir::new(&state_base(), &opts.name)?;
    let _lock = dir.lock()?;
    let result = boot_and_wait(opts, &dir);
    dir.remove();
    result
}

fn boot_and_wait(opts: &VmOptions, dir: &VmDir) -> Result<(), SharedError> {
    let nets = network::vm_nets(opts.network, &[])?;
    network::preflight(&nets, &opts.publish)?;
    let guest = GuestFiles::find(opts.guest.as_deref())?;
    let images = DiskCache::user_default().dir;
    fs::create_dir_all(&images).map_err(|e| SharedError::Images(images.clone(), e))?;
    if images.to_string_lossy().contains(',') {
        let comma = std::io::Error::other("a path with a comma");
        return Err(SharedError::Images(images, comma));
    }
    let shares = [format!("{},tag={IMAGE_TAG},ro", images.display())];
    let images = images.canonicalize().unwrap_or(images);
    // Before the boot: a stop that comes meanwhile waits for the agent, then stops the VM.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(SharedError::Signals)?;
    let vmm = std::env::current_exe().map_err(|e| SharedError::Vm(VmError::Spawn(e)))?;
    let mut vm = VmProcess::start(&VmLaunch {
        vmm: &vmm,
        guest: &guest,
        image_disk: None,
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        nets: &nets,
        publish: &opts.publish,
        shares: &shares,
        netns: None,
        console_log: Some(&dir.console_log()),
        run_dir_in: Some(&dir.path),
        balloon: true,
        balloon_stats: Some(&dir.balloon_stats()),
    })?;
    let session = vm.connect(opts.agent_timeout)?;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    dir.save(&VmRecord {
        name: opts.name.clone(),
        pid: std::process::id() as i32,
        vm_pid: vm.pid() as i32,
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        vsock: vm.vsock(),
        publish: opts.publish.clone(),
        images,
        started,
    })?;
    eprintln!("rvmm: VM {} is ready ({})", opts.name, session.agent);
    loop {
        if signals.pending().next().is_some() {
            break;
        }
        if let Some(why) = vm.ended() {
            return Err(SharedError::VmEnded {
                name: opts.name.clone(),
                why,
            });
        }
        std::thread::sleep(POLL);
    }
    // A paused guest could not power off (a running one refuses the resume: no matter).
    let _ = crate::vm::api_request(vm.run_dir(), "resume");
    if session.shutdown().is_ok() {
        vm.finish(POWER_OFF_GRACE);
    }
    eprintln!("rvmm: VM {} stopped", opts.name);
    Ok(())
}
