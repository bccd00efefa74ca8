//! An address-space bus (port I/O or MMIO) dispatching guest accesses to devices.
//!
//! The bus is filled during set-up and then only read, so vCPU threads share it through an
//! `Arc<Bus>` without any bus-wide lock; each device has its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A device that the guest reaches through loads/stores on a bus.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` from the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from the device's base address.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from setting up a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range has zero length.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
    /// `base + len` does not fit in 64 bits.
    #[error("bus range {base:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range intersects one that is already mapped.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

struct Mapping {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Maps disjoint address ranges to devices.
#[derive(Default)]
pub struct Bus {
    /// Keyed by range start; ranges never overlap, so the greatest start `<= addr` is the only
    /// candidate for any address.
    ranges: BTreeMap<u64, Mapping>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        let prev_overlaps = self
            .ranges
            .range(..=base)
            .next_back()
            .is_some_and(|(start, m)| start + m.len > base);
        let next_overlaps = self.ranges.range(base..end).next().is_some();
        if prev_overlaps || next_overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Mapping { len, device });
        Ok(())
    }

    /// Finds the device whose range fully contains `[addr, addr + size)`, with the offset of
    /// `addr` inside it. An access straddling a range boundary is treated as unmapped rather than
    /// handed to a device that would misinterpret it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&Mapping, u64)> {
        let (start, mapping) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - start;
        let size = u64::try_from(size).ok()?;
        (offset.checked_add(size)? <= mapping.len).then_some((mapping, offset))
    }

    /// Dispatches a guest read; returns `false` when nothing is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((mapping, offset)) = self.resolve(addr, data.len()) else {
            return false;
        };
        // A device that panicked under its lock is still the best state we have; vCPUs must
        // not cascade that panic.
        let mut device = mapping
            .device
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        device.read(offset, data);
        true
    }

    /// Dispatches a guest write; returns `false` when nothing is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((mapping, offset)) = self.resolve(addr, data.len()) else {
            return false;
        };
        let mut device = mapping
            .device
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        device.write(offset, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses and answers reads with its offset.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn insert_rejects_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::ZeroLength(0x200))
        );
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
        for (base, len) in [
            (0x100, 0x10),
            (0xf8, 0x9),
            (0x10f, 1),
            (0x108, 0x100),
            (0, 0x1000),
        ] {
            assert_eq!(
                bus.insert(dev(), base, len),
                Err(BusError::Overlap { base, len }),
                "{base:#x}+{len:#x}"
            );
        }
        // Adjacent ranges on both sides are fine.
        bus.insert(dev(), 0xf0, 0x10).unwrap();
        bus.insert(dev(), 0x110, 0x10).unwrap();
        bus.insert(dev(), u64::MAX - 1, 1).unwrap();
    }

    #[test]
    fn dispatches_with_offsets() {
        let mut bus = Bus::new();
        let a = dev();
        let b = dev();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 0x1000).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        let mut data = [0u8; 4];
        assert!(bus.read(0x410, &mut data));
        assert_eq!(data, [0x10; 4]);

        assert!(bus.write(0x3ff, &[7]));
        assert!(bus.write(0x400, &[1, 2, 3, 4]));
        assert_eq!(a.lock().unwrap().writes, vec![(7, vec![7])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0, vec![1, 2, 3, 4])]);
    }

    #[test]
    fn unmapped_and_straddling_accesses_are_refused() {
        let mut bus = Bus::new();
        let a = dev();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut data = [0xffu8; 2];
        assert!(!bus.read(0x3f7, &mut data[..1]));
        assert!(!bus.read(0x400, &mut data[..1]));
        assert!(!bus.read(0x3ff, &mut data));
        assert_eq!(data, [0xff; 2]);
        assert!(!bus.write(0, &[1]));
        assert!(!bus.write(0x3ff, &[1, 2]));
        assert!(!Bus::new().read(0, &mut data));
        assert!(a.lock().unwrap().writes.is_empty());
    }
}
