//! rvmm: a small virtual machine monitor on Linux KVM. This package is the `rvmm` binary and
//! its command line; the VMM is `rvmm-vmm`, and `rvmm run` and `rvmm bench` are
//! `rvmm-container` and `rvmm-bench`.

pub mod cli;
