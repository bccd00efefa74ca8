//! What the report says about the machine: cores, CPU, kernel, and what kind of KVM it has.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use rvmm_vmm::vstate::kvm::{emulating_module_loaded, kvm_available};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmKind {
    Hardware,
    /// A real KVM inside a machine whose CPU QEMU's TCG emulates (resources/nested-kvm.sh).
    NestedInTcg,
    Emulated,
    Absent,
}

/// The hypervisor signature of CPUID leaf 0x4000_0000, e.g. `KVMKVMKVM` or, under QEMU's
/// TCG, `TCGTCGTCGTCG`; empty on bare metal.
fn hypervisor_signature() -> String {
    use std::arch::x86_64::__cpuid;
    // Bit 31 of ECX of leaf 1: running under a hypervisor, so leaf 0x4000_0000 is defined.
    if __cpuid(1).ecx & (1 << 31) == 0 {
        return String::new();
    }
    let leaf = __cpuid(0x4000_0000);
    let bytes: Vec<u8> = [leaf.ebx, leaf.ecx, leaf.edx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .to_string()
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
        } else if hypervisor_signature() == "TCGTCGTCGTCG" {
            KvmKind::NestedInTcg
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
            KvmKind::NestedInTcg => {
                "KVM nested in TCG: a real KVM (nested SVM with nested paging) inside a QEMU \
                 machine whose CPU is emulated by TCG (resources/nested-kvm.sh). Guests run \
                 through KVM's real code paths, but every instruction, the host's included, \
                 is translated: absolute figures are TCG's, far below hardware; ratios between \
                 rows measured in the same run are a fair side-by-side"
            }
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
    fn markdown_names_a_kvm_nested_in_tcg() {
        let machine = Machine {
            kvm: KvmKind::NestedInTcg,
            emulation: None,
            ..Machine::example()
        };
        assert!(machine.markdown().contains("KVM nested in TCG"));
    }

    #[test]
    fn markdown_states_emulation_and_its_factor() {
        let md = Machine::example().markdown();
        assert!(md.contains("emulated"), "{md}");
        assert!(md.contains("2000× slower"), "{md}");
    }
}
