//! The host side of KVM: opening /dev/kvm, checking what rvmm needs, and recognising an
//! emulating (nested, non-hardware) KVM on which guests run slowly and need a baseline CPU.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("the host KVM lacks a capability rvmm needs: {0:?}")]
    MissingCap(Cap),
    #[error("--cpus {asked} is more than this host's KVM allows ({max})")]
    TooManyVcpus { asked: u8, max: usize },
}

/// Capabilities rvmm relies on; their absence is refused up front rather than failing later.
const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Pit2,
    Cap::Irqfd,
    Cap::Ioeventfd,
    Cap::UserMemory,
    Cap::ImmediateExit,
];

/// Modules that provide /dev/kvm by emulating guest kernel code instead of using VMX/SVM.
const EMULATING_KVM_MODULES: [&str; 1] = ["kvm_pvm"];

/// An opened, checked /dev/kvm together with what we learned about the host.
pub struct KvmHost {
    pub kvm: Kvm,
    /// Guest kernel code is emulated instruction by instruction: slow, and some instructions
    /// are missing, so guests need the baseline CPU template.
    pub emulated: bool,
}

impl KvmHost {
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(api));
        }
        if let Some(cap) = REQUIRED_CAPS.iter().find(|c| !kvm.check_extension(**c)) {
            return Err(KvmError::MissingCap(*cap));
        }
        Ok(KvmHost {
            kvm,
            emulated: emulating_module_loaded(Path::new("/sys/module")),
        })
    }
}

impl KvmHost {
    /// Refuses more vCPUs than KVM will create (KVM_CAP_MAX_VCPUS) before any is made.
    pub fn check_vcpus(&self, asked: u8) -> Result<(), KvmError> {
        let max = self.kvm.get_max_vcpus();
        if usize::from(asked) > max {
            return Err(KvmError::TooManyVcpus { asked, max });
        }
        Ok(())
    }
}

/// True when this host's KVM comes from a module known to emulate guest kernel code.
pub fn emulating_module_loaded(sys_module: &Path) -> bool {
    EMULATING_KVM_MODULES
        .iter()
        .any(|m| sys_module.join(m).exists())
}

/// True when /dev/kvm exists and can be opened: tests use this to decide whether to skip.
pub fn kvm_available() -> bool {
    Kvm::new().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn detects_emulating_module() {
        let dir = TempDir::new().unwrap();
        assert!(!emulating_module_loaded(dir.as_path()));
        std::fs::create_dir(dir.as_path().join("kvm_intel")).unwrap();
        assert!(!emulating_module_loaded(dir.as_path()));
        std::fs::create_dir(dir.as_path().join("kvm_pvm")).unwrap();
        assert!(emulating_module_loaded(dir.as_path()));
    }
}
