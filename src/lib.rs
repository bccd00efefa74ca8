//! rvmm: a small virtual machine monitor on Linux KVM. This package is the `rvmm` and
//! `rvmm-oci` binaries and their command lines; the VMM is `rvmm-vmm`, `rvmm run` and `rvmm
//! bench` are `rvmm-container` and `rvmm-bench`, and the OCI runtime is `rvmm-oci`.

pub mod cli;
pub mod oci_cli;
pub mod shared_cli;
