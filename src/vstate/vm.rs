//! The VM file descriptor: interrupt controller, PIT, guest memory slots, irqfd and ioeventfd.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// KVM on Intel needs three pages for the real-mode TSS somewhere the guest never uses:
/// just below the 4 GiB boundary, inside the MMIO hole (as other VMMs place it).
const TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the VM")]
    Create(#[source] kvm_ioctls::Error),
    #[error("cannot set the TSS address")]
    Tss(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel interrupt controller")]
    IrqChip(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("cannot register guest memory slot {slot}")]
    MemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the guest needs {needed} memory slots, KVM offers {max}")]
    TooManySlots { needed: usize, max: usize },
    #[error("cannot register irqfd for GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register ioeventfd at {addr:#x}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates a VM with its interrupt controllers, in the order KVM requires (irqchip before
    /// any vCPU), and a PIT when `legacy_timer` is set.
    ///
    /// A hardware-reduced ACPI platform has no PIT: Linux never touches one there (it uses the
    /// local APIC timer and kvmclock). Leaving it out matters for start and exit: the PIT's
    /// worker thread and I/O ports make KVM's teardown of the VM wait ~15 ms.
    pub fn new(kvm: &Kvm, legacy_timer: bool) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(TSS_ADDRESS).map_err(VmError::Tss)?;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        if legacy_timer {
            // The dummy speaker port keeps Linux's PC-speaker probing inside KVM.
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(VmError::Pit)?;
        }
        Ok(Vm { fd })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Maps every region of `mem` into the guest physical address space.
    pub fn register_memory(&self, kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        let max = kvm.get_nr_memslots();
        let needed = mem.num_regions();
        if needed > max {
            return Err(VmError::TooManySlots { needed, max });
        }
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the VMM keeps alive for
            // as long as the VM exists; the slot numbers are distinct.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }

    /// Makes a write to `evt` raise interrupt line `gsi` without leaving the kernel.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Makes a 32-bit guest write of `datamatch` to MMIO `addr` signal `evt` instead of exiting.
    pub fn register_mmio_ioeventfd(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }
}
