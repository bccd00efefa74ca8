//! The balloon's queues as page ranges: PFN arrays on the inflate queue, free page runs on the
//! reporting queue. What to do with a range is the caller's (`discard` in the device, a
//! recorder in tests).

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::discard::DiscardError;
use super::{PAGE_SIZE, QUEUE_SIZE};
use crate::virtio::drain::{drain, DrainError};
use crate::virtio::sg::SgList;
use crate::{warn_once, LogOnce, Problem};

/// Most bytes of PFNs in one inflate chain: Linux sends at most 256 PFNs (1 KiB) at a time.
pub const MAX_PFN_BYTES: u64 = 64 * 1024;

/// Gives a range of guest memory back; the bytes given.
pub type Discard<'a> = dyn FnMut(GuestAddress, u64) -> Result<u64, DiscardError> + 'a;

/// Serves the three queues; counts what went back to the host.
#[derive(Default)]
pub struct BalloonHandler {
    /// Bytes given back to the host so far, inflated or reported.
    pub discarded: u64,
    warned: LogOnce,
}

impl BalloonHandler {
    /// Discards the pages every inflate chain names; returns whether the driver needs an
    /// interrupt.
    pub fn process_inflate(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        discard: &mut Discard,
    ) -> Result<bool, DrainError> {
        drain(mem, queue, |chain| {
            for (addr, len) in self.pfn_runs(mem, chain) {
                self.give_back(discard, addr, len);
            }
            0
        })
    }

    /// Returns every deflate chain: a discarded page comes back when the guest touches it.
    pub fn process_deflate(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DrainError> {
        drain(mem, queue, |_| 0)
    }

    /// Discards every free page run the reporting chains hold, then returns them.
    pub fn process_reporting(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        discard: &mut Discard,
    ) -> Result<bool, DrainError> {
        drain(mem, queue, |chain| {
            match SgList::new(chain, mem, true, QUEUE_SIZE.into(), u64::MAX) {
                Ok(sg) => {
                    for buf in sg.list {
                        self.give_back(discard, buf.addr, buf.len.into());
                    }
                }
                Err(e) => self.refuse(&e),
            }
            0
        })
    }

    /// The pages an inflate chain names, as runs of consecutive pages (addr, len).
    fn pfn_runs(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: impl Iterator<Item = Descriptor>,
    ) -> Vec<(GuestAddress, u64)> {
        let sg = match SgList::new(chain, mem, false, QUEUE_SIZE.into(), MAX_PFN_BYTES) {
            Ok(sg) => sg,
            Err(e) => {
                self.refuse(&e);
                return Vec::new();
            }
        };
        // At most MAX_PFN_BYTES.
        let mut bytes = vec![0u8; sg.len as usize];
        if let Err(e) = sg.read_into(mem, &mut bytes) {
            self.refuse(&e);
            return Vec::new();
        }
        let mut runs: Vec<(GuestAddress, u64)> = Vec::new();
        for pfn in bytes.chunks_exact(4) {
            let addr = u64::from(u32::from_le_bytes(pfn.try_into().unwrap())) * PAGE_SIZE;
            match runs.last_mut() {
                Some((start, len)) if start.0 + *len == addr => *len += PAGE_SIZE,
                _ => runs.push((GuestAddress(addr), PAGE_SIZE)),
            }
        }
        runs
    }

    fn give_back(&mut self, discard: &mut Discard, addr: GuestAddress, len: u64) {
        match discard(addr, len) {
            Ok(given) => self.discarded += given,
            Err(e) => warn_once!(
                self.warned,
                Problem::Memory,
                "virtio-balloon: keeping {:#x}+{len:#x}: {}",
                addr.0,
                crate::error_chain(&e)
            ),
        }
    }

    fn refuse(&mut self, e: &dyn std::fmt::Display) {
        warn_once!(
            self.warned,
            Problem::Chain,
            "virtio-balloon: returning a chain untouched: {e}"
        );
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::virtio::block::test_utils::{mem, MEM_SIZE, R, W};
    use crate::virtio::console::test_utils::BUF;
    use crate::virtio::net::test_utils::Driver;

    /// What a discard was asked for, in order; refuses anything at or above `MEM_SIZE`.
    fn recorder(
        log: &mut Vec<(u64, u64)>,
    ) -> impl FnMut(GuestAddress, u64) -> Result<u64, DiscardError> + '_ {
        move |addr, len| {
            if addr.0 + len > MEM_SIZE as u64 {
                return Err(DiscardError::OutsideMemory { addr: addr.0, len });
            }
            log.push((addr.0, len));
            Ok(len)
        }
    }

    fn put_pfns(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    #[test]
    fn inflated_pfns_are_discarded_in_runs() {
        let mem = mem();
        put_pfns(&mem, BUF, &[16, 17, 18, 40, 19]);
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 20, R)]);
        let mut queue = driver.queue();
        let (mut log, mut handler) = (Vec::new(), BalloonHandler::default());
        assert!(handler
            .process_inflate(&mem, &mut queue, &mut recorder(&mut log))
            .unwrap());
        let p = PAGE_SIZE;
        assert_eq!(log, vec![(16 * p, 3 * p), (40 * p, p), (19 * p, p)]);
        assert_eq!(handler.discarded, 5 * p);
        assert_eq!(driver.used(), vec![(0, 0)]);
    }

    #[test]
    fn reported_runs_are_discarded_and_returned() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(0x10_0000, 0x2_0000, W), (0x18_0000, 0x1000, W)]);
        let mut queue = driver.queue();
        let (mut log, mut handler) = (Vec::new(), BalloonHandler::default());
        assert!(handler
            .process_reporting(&mem, &mut queue, &mut recorder(&mut log))
            .unwrap());
        assert_eq!(log, vec![(0x10_0000, 0x2_0000), (0x18_0000, 0x1000)]);
        assert_eq!(handler.discarded, 0x2_1000);
        assert_eq!(driver.used(), vec![(0, 0)]);
    }

    /// Wrong directions, memory past the end, PFNs beyond guest memory: each chain comes back
    /// and nothing outside guest memory is discarded.
    #[test]
    fn hostile_chains_are_returned_and_discard_nothing_outside() {
        let mem = mem();
        let top = MEM_SIZE as u64;
        put_pfns(&mem, BUF, &[u32::MAX, (top / PAGE_SIZE) as u32]);
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 8, R)]);
        driver.post(&[(BUF, 8, W)]);
        driver.post(&[(top - 8, 16, R)]);
        let mut queue = driver.queue();
        let (mut log, mut handler) = (Vec::new(), BalloonHandler::default());
        handler
            .process_inflate(&mem, &mut queue, &mut recorder(&mut log))
            .unwrap();
        assert_eq!(driver.used(), vec![(0, 0), (1, 0), (2, 0)]);

        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 8, R)]);
        driver.post(&[(top - 8, 16, W)]);
        let mut queue = driver.queue();
        handler
            .process_reporting(&mem, &mut queue, &mut recorder(&mut log))
            .unwrap();
        assert_eq!(driver.used(), vec![(0, 0), (1, 0)]);
        assert!(log.is_empty(), "{log:?}");
        assert_eq!(handler.discarded, 0);
    }

    #[test]
    fn deflated_chains_are_returned() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 8, R)]);
        let mut queue = driver.queue();
        assert!(BalloonHandler::default()
            .process_deflate(&mem, &mut queue)
            .unwrap());
        assert_eq!(driver.used(), vec![(0, 0)]);
    }
}
