//! Guest CPUID: KVM's supported set, filtered by a CPU template, with per-vCPU topology.
//!
//! Everything here works on plain `kvm_cpuid_entry2` slices so tests can feed made-up leaves.

use kvm_bindings::kvm_cpuid_entry2;

use crate::config::CpuTemplate;

/// A feature bit: (leaf, subleaf, register, bit).
#[derive(Clone, Copy, Debug)]
struct Feature {
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const fn feat(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Features the baseline template hides. Chosen because a guest kernel does not need them and
/// because emulating KVMs cannot run them (XRSTOR, POPCNT, CLAC, CMPXCHG16B were each seen to
/// kill a guest with an emulation failure on such a host).
const BASELINE_HIDDEN: &[Feature] = &[
    feat(1, 0, Reg::Ecx, 1),            // PCLMULQDQ
    feat(1, 0, Reg::Ecx, 12),           // FMA
    feat(1, 0, Reg::Ecx, 13),           // CMPXCHG16B
    feat(1, 0, Reg::Ecx, 17),           // PCID
    feat(1, 0, Reg::Ecx, 22),           // MOVBE
    feat(1, 0, Reg::Ecx, 23),           // POPCNT
    feat(1, 0, Reg::Ecx, 25),           // AES
    feat(1, 0, Reg::Ecx, 26),           // XSAVE
    feat(1, 0, Reg::Ecx, 27),           // OSXSAVE
    feat(1, 0, Reg::Ecx, 28),           // AVX
    feat(1, 0, Reg::Ecx, 29),           // F16C
    feat(1, 0, Reg::Ecx, 30),           // RDRAND
    feat(7, 0, Reg::Ebx, 0),            // FSGSBASE
    feat(7, 0, Reg::Ebx, 3),            // BMI1
    feat(7, 0, Reg::Ebx, 4),            // HLE
    feat(7, 0, Reg::Ebx, 5),            // AVX2
    feat(7, 0, Reg::Ebx, 7),            // SMEP
    feat(7, 0, Reg::Ebx, 8),            // BMI2
    feat(7, 0, Reg::Ebx, 10),           // INVPCID
    feat(7, 0, Reg::Ebx, 11),           // RTM
    feat(7, 0, Reg::Ebx, 16),           // AVX512F
    feat(7, 0, Reg::Ebx, 18),           // RDSEED
    feat(7, 0, Reg::Ebx, 19),           // ADX
    feat(7, 0, Reg::Ebx, 20),           // SMAP
    feat(7, 0, Reg::Ebx, 23),           // CLFLUSHOPT
    feat(7, 0, Reg::Ebx, 24),           // CLWB
    feat(7, 0, Reg::Ebx, 29),           // SHA
    feat(7, 0, Reg::Ecx, 2),            // UMIP
    feat(7, 0, Reg::Ecx, 3),            // PKU
    feat(7, 0, Reg::Ecx, 9),            // VAES
    feat(7, 0, Reg::Ecx, 10),           // VPCLMULQDQ
    feat(7, 0, Reg::Ecx, 16),           // LA57
    feat(7, 0, Reg::Ecx, 22),           // RDPID
    feat(7, 0, Reg::Edx, 29),           // ARCH_CAPABILITIES (its MSR cannot be set on such hosts)
    feat(0x8000_0001, 0, Reg::Ecx, 5),  // ABM (LZCNT)
    feat(0x8000_0001, 0, Reg::Ecx, 6),  // SSE4A
    feat(0x8000_0001, 0, Reg::Ecx, 11), // XOP
    feat(0x8000_0001, 0, Reg::Ecx, 16), // FMA4
    feat(0x8000_0001, 0, Reg::Ecx, 21), // TBM
    feat(0x8000_0001, 0, Reg::Ecx, 22), // TOPOEXT
    feat(0x8000_0001, 0, Reg::Ecx, 23), // PERFCTR_CORE
];

/// Leaves the baseline drops entirely: XSAVE state enumeration (meaningless without XSAVE)
/// and AVX-512/AMX sub-leaves.
const BASELINE_DROPPED_LEAVES: &[u32] = &[0xd, 0x14, 0x19, 0x1d, 0x1e];

/// Kernel parameters that turn off, inside the guest, what the baseline template hides.
/// An emulating KVM answers CPUID for guest kernel code itself and ignores most of the mask
/// (measured: of the leaf-1 bits only CMPXCHG16B disappeared), so there the guest kernel has
/// to be told directly.
pub const BASELINE_KERNEL_PARAMS: &str =
    "noxsave nofsgsbase nopcid clearcpuid=smap,smep,popcnt,rdrand,avx,avx2";

/// CPUID.1:ECX bit 31 tells the guest it runs under a hypervisor.
const HYPERVISOR_BIT: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: more than one logical processor per package.
const HTT_BIT: u32 = 1 << 28;

/// Applies a template to the host-supported entries, removing dropped leaves.
pub fn apply_template(entries: &mut Vec<kvm_cpuid_entry2>, template: CpuTemplate) {
    if template == CpuTemplate::Host {
        return;
    }
    entries.retain(|e| !BASELINE_DROPPED_LEAVES.contains(&e.function));
    for f in BASELINE_HIDDEN {
        let Some(e) = entries
            .iter_mut()
            .find(|e| e.function == f.leaf && e.index == f.subleaf)
        else {
            continue;
        };
        let reg = match f.reg {
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        };
        *reg &= !(1u32 << f.bit);
    }
}

/// Rewrites the topology leaves for vCPU `cpu_id` of `cpu_count`: one core per vCPU, one
/// thread per core, APIC id = vCPU index (what the MP table announces).
pub fn set_topology(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8) {
    let id = u32::from(cpu_id);
    let count = u32::from(cpu_count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count << 16);
                e.ecx |= HYPERVISOR_BIT;
                if count > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            4 => {
                // Cores per package - 1 in bits 31:26; caches shared by one thread each.
                e.eax = (e.eax & 0x0000_3fff) | ((count - 1) << 26);
            }
            0xb | 0x1f => {
                e.edx = id;
                // Sub-leaf 0: SMT level (1 thread); sub-leaf 1: core level (all vCPUs).
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = bits_for(count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: NC = cores - 1, ApicIdCoreIdSize large enough for the ids.
                e.ecx = (e.ecx & !0xf0ff) | (bits_for(count) << 12) | (count - 1);
            }
            0x8000_001e => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// Number of APIC-id bits needed to number `count` logical processors.
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn baseline_hides_features_and_leaves() {
        let mut entries = vec![
            entry(1, 0),
            entry(7, 0),
            entry(0xd, 0),
            entry(0xd, 1),
            entry(0x8000_0001, 0),
        ];
        apply_template(&mut entries, CpuTemplate::Baseline);
        assert!(entries.iter().all(|e| e.function != 0xd));
        let l1 = find(&entries, 1, 0);
        for bit in [13, 17, 23, 26, 27, 28, 30] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        // SSE3, SSSE3, SSE4.1/4.2 stay: the baseline is still a modern x86-64.
        for bit in [0, 9, 19, 20] {
            assert_ne!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        let l7 = find(&entries, 7, 0);
        for bit in [0, 5, 7, 20] {
            assert_eq!(l7.ebx & (1 << bit), 0, "leaf 7 ebx bit {bit}");
        }
        assert_eq!(l7.edx & (1 << 29), 0);
        assert_eq!(find(&entries, 0x8000_0001, 0).ecx & (1 << 22), 0);
    }

    #[test]
    fn host_template_keeps_everything() {
        let mut entries = vec![entry(1, 0), entry(0xd, 0)];
        let before = entries.clone();
        apply_template(&mut entries, CpuTemplate::Host);
        assert_eq!(entries.len(), before.len());
        assert_eq!(entries[0].ecx, u32::MAX);
    }

    #[test]
    fn topology_per_vcpu() {
        let mut entries = vec![
            entry(1, 0),
            entry(4, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ];
        set_topology(&mut entries, 3, 4);
        let l1 = find(&entries, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(l1.edx & HTT_BIT, 0);
        assert_eq!(find(&entries, 4, 0).eax >> 26, 3);
        let smt = find(&entries, 0xb, 0);
        assert_eq!((smt.ebx, smt.edx), (1, 3));
        let core = find(&entries, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 3));
        assert_eq!(find(&entries, 0x8000_0008, 0).ecx & 0xff, 3);
        assert_eq!(find(&entries, 0x8000_001e, 0).eax, 3);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut entries = vec![entry(1, 0), entry(0xb, 1)];
        set_topology(&mut entries, 0, 1);
        assert_eq!(find(&entries, 1, 0).edx & HTT_BIT, 0);
        assert_eq!(find(&entries, 0xb, 1).eax, 0);
    }

    #[test]
    fn apic_id_bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
