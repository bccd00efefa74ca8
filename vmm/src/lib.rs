//! The rvmm VMM core: a VM on Linux KVM built from a [`config::VmConfig`] and run to its end.
//! The only code that touches /dev/kvm; device models live in `rvmm-devices`, boot tables in
//! `rvmm-firmware`, the command line in the `rvmm` binary.

pub mod api;
pub mod boot;
pub mod config;
pub mod console_out;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod jail;
pub mod kernel_image;
pub mod passt;
pub mod running;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod terminal;
pub mod virtiofsd;
pub mod vmm;
pub mod vstate;

/// An error and its causes joined by ": ", so that every failure prints as one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // Some errors repeat their cause in their own message.
        let cause_msg = cause.to_string();
        if !msg.ends_with(&cause_msg) {
            msg = format!("{msg}: {cause_msg}");
        }
        source = cause.source();
    }
    msg
}
