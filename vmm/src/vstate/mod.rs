//! Everything that talks to KVM.

pub mod cpuid;
pub mod kvm;
pub mod memory;
pub mod pause;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
