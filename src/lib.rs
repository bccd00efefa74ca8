//! rvmm: a small virtual machine monitor on Linux KVM. This crate is the VMM core, the only
//! code that touches /dev/kvm; device models live in `rvmm-devices`, boot tables in
//! `rvmm-firmware`.

pub mod bench;
pub mod boot;
pub mod config;
pub mod console_out;
pub mod container;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod kernel_image;
pub mod seccomp;
pub mod signals;
pub mod terminal;
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
