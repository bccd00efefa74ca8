//! virtio-mmio registers: the input is a sequence of guest register reads and writes, of any
//! width, at any offset of the window (registers and configuration space), in any order, on a
//! transport in front of a device with two queues. Control bit 3 makes the device refuse
//! activation, bit 4 makes it refuse reset.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use rvmm_devices::bus::BusDevice;
use rvmm_devices::interrupt::EventFdInterrupt;
use rvmm_devices::virtio::mmio::MmioTransport;
use rvmm_devices::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Bytes per operation: kind and width, 16-bit offset, 32-bit value.
const OP_LEN: usize = 7;
/// Registers, then 0x100 bytes of configuration space.
const WINDOW: u64 = 0x200;

/// A device with two queues and 8 bytes of configuration space.
struct Dummy {
    evts: Vec<EventFd>,
    config: [u8; 8],
    refuse_activate: bool,
    refuse_reset: bool,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 256]
    }
    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 0b1011
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|o| self.config.get(o)).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(slot) = at.and_then(|o| self.config.get_mut(o)) {
                *slot = b;
            }
        }
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        _queues: Vec<Queue>,
        _interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.refuse_activate {
            return Err(ActivateError::QueueNotReady(0));
        }
        Ok(())
    }
    fn reset(&mut self) -> bool {
        !self.refuse_reset
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, ops)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), rvmm_fuzz::MEM_SIZE)])
        .expect("guest memory");
    let dummy = Dummy {
        evts: (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            .collect(),
        config: *b"rvmmfuzz",
        refuse_activate: control & 0x08 != 0,
        refuse_reset: control & 0x10 != 0,
    };
    let irq = Arc::new(EventFdInterrupt::new().expect("interrupt eventfd"));
    let mut transport =
        MmioTransport::new(mem, Arc::new(Mutex::new(dummy)), irq).expect("transport");
    for op in ops.chunks_exact(OP_LEN) {
        let width = 1usize << (op[0] >> 1 & 0x3);
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % WINDOW;
        let value = u64::from(u32::from_le_bytes([op[3], op[4], op[5], op[6]]));
        let bytes = value.to_le_bytes();
        if op[0] & 1 == 0 {
            let mut buf = [0u8; 8];
            transport.read(offset, &mut buf[..width]);
        } else {
            transport.write(offset, &bytes[..width]);
        }
    }
});
