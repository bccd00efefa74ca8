//! A vCPU's architectural state as KVM reports it, for snapshots: registers, segment and
//! control registers, XSAVE (FPU/SSE/AVX), XCRs, debug registers, the MSRs KVM saves and
//! restores, the local APIC, the MP state, pending events, and the CPUID the vCPU was given.
//! Each KVM structure is kept as its raw bytes in hex: the same rvmm reads them back.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes};

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("cannot {what}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the saved {0} is malformed")]
    Malformed(&'static str),
}

/// One vCPU's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    regs: String,
    sregs: String,
    xsave: String,
    xcrs: String,
    debugregs: String,
    lapic: String,
    mp_state: String,
    events: String,
    /// The CPUID entries, concatenated.
    cpuid: String,
    /// (index, value) of each MSR.
    msrs: Vec<(u32, u64)>,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { what, source }
}

impl VcpuState {
    /// Reads the state of a vCPU that is outside KVM_RUN and has no I/O left to complete.
    /// `msr_indices`: the MSRs KVM lists as saved and restored (`KVM_GET_MSR_INDEX_LIST`).
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, VcpuStateError> {
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("read CPUID"))?;
        Ok(VcpuState {
            regs: hex(&fd.get_regs().map_err(ioctl("read registers"))?),
            sregs: hex(&fd.get_sregs().map_err(ioctl("read special registers"))?),
            xsave: hex(&fd.get_xsave().map_err(ioctl("read XSAVE"))?),
            xcrs: hex(&fd.get_xcrs().map_err(ioctl("read XCRs"))?),
            debugregs: hex(&fd.get_debug_regs().map_err(ioctl("read debug registers"))?),
            lapic: hex(&fd.get_lapic().map_err(ioctl("read the LAPIC"))?),
            mp_state: hex(&fd.get_mp_state().map_err(ioctl("read the MP state"))?),
            events: hex(&fd.get_vcpu_events().map_err(ioctl("read events"))?),
            cpuid: cpuid.as_slice().iter().map(hex).collect(),
            msrs: read_msrs(fd, msr_indices)?,
        })
    }

    /// Loads the state into a new vCPU, in the order KVM needs (Firecracker's): CPUID first,
    /// the LAPIC before the MSRs (the TSC deadline), pending events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let entries = unhex_all(&self.cpuid, "CPUID")?;
        let cpuid =
            CpuId::from_entries(&entries).map_err(|_| VcpuStateError::Malformed("CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(ioctl("set CPUID"))?;
        let mp: kvm_mp_state = unhex(&self.mp_state, "MP state")?;
        fd.set_mp_state(mp).map_err(ioctl("set the MP state"))?;
        let regs: kvm_regs = unhex(&self.regs, "registers")?;
        fd.set_regs(&regs).map_err(ioctl("set registers"))?;
        let sregs: kvm_sregs = unhex(&self.sregs, "special registers")?;
        fd.set_sregs(&sregs)
            .map_err(ioctl("set special registers"))?;
        let xsave: kvm_xsave = unhex(&self.xsave, "XSAVE")?;
        // SAFETY: a kvm_xsave of exactly the size KVM_SET_XSAVE reads (no XSAVE2 features are
        // enabled for rvmm's vCPUs).
        unsafe { fd.set_xsave(&xsave) }.map_err(ioctl("set XSAVE"))?;
        let xcrs: kvm_xcrs = unhex(&self.xcrs, "XCRs")?;
        fd.set_xcrs(&xcrs).map_err(ioctl("set XCRs"))?;
        let debugregs: kvm_debugregs = unhex(&self.debugregs, "debug registers")?;
        fd.set_debug_regs(&debugregs)
            .map_err(ioctl("set debug registers"))?;
        let lapic: kvm_lapic_state = unhex(&self.lapic, "LAPIC")?;
        fd.set_lapic(&lapic).map_err(ioctl("set the LAPIC"))?;
        write_msrs(fd, &self.msrs)?;
        let events: kvm_vcpu_events = unhex(&self.events, "events")?;
        fd.set_vcpu_events(&events).map_err(ioctl("set events"))
    }
}

/// Every listed MSR KVM can read; one it refuses (some are listed but absent on this CPU) is
/// skipped, as KVM stops a batch at the first refusal.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&batch).map_err(|_| VcpuStateError::Malformed("MSRs"))?;
        let read = fd.get_msrs(&mut msrs).map_err(ioctl("read MSRs"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Every saved MSR KVM takes. KVM stops a batch at the first MSR it refuses; such an MSR
/// (listed, and readable, but not writable from user space on this host) is skipped and
/// named at debug level.
fn write_msrs(fd: &VcpuFd, saved: &[(u32, u64)]) -> Result<(), VcpuStateError> {
    let mut rest = saved;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Malformed("MSRs"))?;
        let set = fd.set_msrs(&msrs).map_err(ioctl("set MSRs"))?;
        if let Some(&(index, data)) = rest.get(set) {
            log::debug!("KVM refused MSR {index:#x} = {data:#x}; left as it is");
        }
        rest = &rest[(set + 1).min(rest.len())..];
    }
    Ok(())
}

fn hex<T: IntoBytes + Immutable>(value: &T) -> String {
    value
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn bytes(text: &str, what: &'static str) -> Result<Vec<u8>, VcpuStateError> {
    if !text.len().is_multiple_of(2) {
        return Err(VcpuStateError::Malformed(what));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2).unwrap_or("x"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| VcpuStateError::Malformed(what))
}

/// One structure, which must have exactly its size.
fn unhex<T: FromBytes>(text: &str, what: &'static str) -> Result<T, VcpuStateError> {
    T::read_from_bytes(&bytes(text, what)?).map_err(|_| VcpuStateError::Malformed(what))
}

/// Structures one after another.
fn unhex_all<T: FromBytes>(text: &str, what: &'static str) -> Result<Vec<T>, VcpuStateError> {
    let raw = bytes(text, what)?;
    let size = std::mem::size_of::<T>();
    if raw.len() % size != 0 || raw.len() / size > KVM_MAX_CPUID_ENTRIES {
        return Err(VcpuStateError::Malformed(what));
    }
    raw.chunks(size)
        .map(|c| T::read_from_bytes(c).map_err(|_| VcpuStateError::Malformed(what)))
        .collect()
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    #[test]
    fn structures_round_trip_through_hex() {
        let regs = kvm_regs {
            rip: 0x1234_5678,
            rflags: 2,
            ..Default::default()
        };
        let back: kvm_regs = unhex(&hex(&regs), "registers").unwrap();
        assert_eq!((back.rip, back.rflags), (0x1234_5678, 2));
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                eax: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 9,
                ..Default::default()
            },
        ];
        let text: String = entries.iter().map(hex).collect();
        let back: Vec<kvm_cpuid_entry2> = unhex_all(&text, "CPUID").unwrap();
        assert_eq!((back[0].eax, back[1].function, back[1].ebx), (7, 7, 9));
    }

    #[test]
    fn malformed_text_is_refused() {
        let regs = hex(&kvm_regs::default());
        for bad in ["", "0", "zz", &regs[2..], &format!("{regs}00")] {
            assert!(unhex::<kvm_regs>(bad, "registers").is_err(), "{bad:?}");
        }
        assert!(unhex_all::<kvm_cpuid_entry2>("00", "CPUID").is_err());
    }
}
