//! rvmm: a small virtual machine monitor on Linux KVM. This crate is the VMM core, the only
//! code that touches /dev/kvm; device models live in `rvmm-devices`, boot tables in
//! `rvmm-firmware`.

pub mod boot;
pub mod config;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod kernel_image;
pub mod seccomp;
pub mod signals;
pub mod terminal;
pub mod vmm;
pub mod vstate;
