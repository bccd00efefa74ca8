//! The VM file descriptor: interrupt controllers, PIT, guest memory slots, irqfd, ioeventfd,
//! and the GSI routes of the split irqchip.

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_irq_routing_msi, kvm_pit_config,
    kvm_userspace_memory_region, KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use rvmm_devices::legacy::ioapic::{MsiMessage, MsiRoutes, IOAPIC_PINS};
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
    #[error("cannot create the in-kernel interrupt controllers")]
    IrqChip(#[source] kvm_ioctls::Error),
    #[error("cannot enable KVM's split irqchip")]
    SplitIrqChip(#[source] kvm_ioctls::Error),
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

/// How interrupts reach the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqChip {
    /// The PC of the MP table: PIC, I/O APIC and PIT all in KVM.
    Legacy,
    /// The hardware-reduced ACPI platform: only the local APICs are in KVM, rvmm's I/O APIC
    /// model programs the routes (as QEMU's microvm and Cloud Hypervisor do). It has no PIC
    /// and no PIT, which Linux never uses there (local APIC timer, kvmclock), and it is far
    /// cheaper to create and tear down: KVM's PIT worker and the I/O devices of the
    /// in-kernel chips made every VM's exit wait ~15 ms and its first memory slot ~7 ms.
    Split,
}

pub struct Vm {
    fd: Arc<VmFd>,
}

impl Vm {
    /// Creates a VM with its interrupt controllers, in the order KVM requires (irqchip before
    /// any vCPU).
    pub fn new(kvm: &Kvm, irqchip: IrqChip) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(TSS_ADDRESS).map_err(VmError::Tss)?;
        match irqchip {
            IrqChip::Legacy => {
                fd.create_irq_chip().map_err(VmError::IrqChip)?;
                // The dummy speaker port keeps Linux's PC-speaker probing inside KVM.
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                fd.create_pit2(pit).map_err(VmError::Pit)?;
            }
            IrqChip::Split => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    ..Default::default()
                };
                // GSIs reserved for the I/O APIC's pins.
                cap.args[0] = IOAPIC_PINS as u64;
                fd.enable_cap(&cap).map_err(VmError::SplitIrqChip)?;
            }
        }
        Ok(Vm { fd: Arc::new(fd) })
    }

    /// The GSI routes an I/O APIC model programs (split irqchip only).
    pub fn msi_routes(&self) -> KvmMsiRoutes {
        KvmMsiRoutes {
            vm: self.fd.clone(),
            routes: [None; IOAPIC_PINS],
        }
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

/// The I/O APIC's pins as KVM GSI routes: GSI = pin, one MSI route per unmasked pin, so an
/// irqfd on the pin's GSI reaches the local APICs without leaving the kernel.
pub struct KvmMsiRoutes {
    vm: Arc<VmFd>,
    routes: [Option<MsiMessage>; IOAPIC_PINS],
}

impl MsiRoutes for KvmMsiRoutes {
    fn set_route(&mut self, pin: usize, route: Option<MsiMessage>) -> std::io::Result<()> {
        let slot = self
            .routes
            .get_mut(pin)
            .ok_or_else(|| std::io::Error::other(format!("no I/O APIC pin {pin}")))?;
        *slot = route;
        let entries: Vec<kvm_irq_routing_entry> = self
            .routes
            .iter()
            .enumerate()
            .filter_map(|(gsi, route)| route.map(|msi| msi_entry(gsi as u32, msi)))
            .collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        // KVM replaces the whole table at once.
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

fn msi_entry(gsi: u32, msi: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi = kvm_irq_routing_msi {
        address_lo: msi.address as u32,
        address_hi: (msi.address >> 32) as u32,
        data: msi.data,
        ..Default::default()
    };
    entry
}
