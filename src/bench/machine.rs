//! What the report says about the machine: cores, CPU, kernel, and what kind of KVM it has.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::vstate::kvm::{emulating_module_loaded, kvm_available};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmKind {
    Hardware,
    Emulated,
    Absent,
}

/// Guest kernel-mode speed against the host, from the same 2-instruction loop on both.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EmulationCheck {
    pub host_mips: f64,
    pub guest_kernel_mips: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub kvm: KvmKind,
    pub emulation: Option<EmulationCheck>,
}

impl Machine {
    pub fn probe() -> Machine {
        let kvm = if !kvm_available() {
            KvmKind::Absent
        } else if emulating_module_loaded(Path::new("/sys/module")) {
            KvmKind::Emulated
        } else {
            KvmKind::Hardware
        };
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            kvm,
            emulation: None,
        }
    }

    pub fn markdown(&self) -> String {
        let mut md = String::from("## Machine\n\n");
        let _ = writeln!(md, "- {} cores, {}", self.cores, self.cpu_model);
        let _ = writeln!(md, "- Linux {}", self.kernel);
        let kvm = match self.kvm {
            KvmKind::Hardware => "hardware-assisted (VMX/SVM)",
            KvmKind::Emulated => {
                "emulated (nested `kvm_pvm` module): guest user mode runs natively but guest \
                 kernel code is emulated instruction by instruction, so every VM figure here \
                 overstates what a VM costs on hardware KVM"
            }
            KvmKind::Absent => "absent (/dev/kvm cannot be opened): no VM figures",
        };
        let _ = writeln!(md, "- KVM: {kvm}");
        if let Some(e) = self.emulation {
            let _ = writeln!(
                md,
                "- Guest kernel-mode code ran at {:.2} MIPS here against {:.0} MIPS for the same \
                 loop as a host process: {:.0}× slower. Guest time spent in the kernel (boot, \
                 exits, page faults) is inflated by about that factor; guest user code is not.",
                e.guest_kernel_mips,
                e.host_mips,
                e.host_mips / e.guest_kernel_mips
            );
        }
        md
    }

    #[cfg(test)]
    pub fn example() -> Machine {
        Machine {
            cores: 2,
            cpu_model: "Example CPU".into(),
            kernel: "6.1.0".into(),
            kvm: KvmKind::Emulated,
            emulation: Some(EmulationCheck {
                host_mips: 2000.0,
                guest_kernel_mips: 1.0,
            }),
        }
    }
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cpu_model() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n";
        assert_eq!(cpu_model(info), "AMD EPYC 7B13");
        assert_eq!(cpu_model(""), "unknown CPU");
    }

    #[test]
    fn markdown_states_emulation_and_its_factor() {
        let md = Machine::example().markdown();
        assert!(md.contains("emulated"), "{md}");
        assert!(md.contains("2000× slower"), "{md}");
    }
}
