//! The statistics queue: the driver has one buffer of `(tag: u16, value: u64)` entries, which
//! the device keeps until it wants fresh figures; then it returns the buffer, and the driver
//! refills it and hands it back (virtio 1.2, 5.5.6.3). The latest figures are written, as one
//! JSON line padded to a fixed size, at the start of a file other processes read (`rvmm vm
//! status`): one `pwrite`, no reopening under the device thread's seccomp filter.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::QUEUE_SIZE;
use crate::virtio::drain::{pop_chain, DrainError};
use crate::virtio::sg::SgList;
use crate::{warn_once, LogOnce, Problem};

/// The feature bit of the statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Bytes of one entry: a little-endian u16 tag and u64 value, packed.
const ENTRY_LEN: usize = 10;
/// Most bytes read from one buffer: Linux sends 10 entries; more tags may come.
const MAX_BYTES: u64 = 64 * ENTRY_LEN as u64;
/// Size of the record written to the file: the JSON line, padded with spaces.
pub const RECORD_LEN: usize = 512;

/// The tags of virtio 1.2 and their names in the JSON record.
const TAGS: [(u16, &str); 10] = [
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
];

/// The driver's figures by tag, in the order given; unknown tags are kept out.
pub fn parse(bytes: &[u8]) -> Vec<(&'static str, u64)> {
    let mut out: Vec<(&'static str, u64)> = Vec::new();
    for entry in bytes.chunks_exact(ENTRY_LEN) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let value = u64::from_le_bytes(entry[2..].try_into().expect("8 bytes"));
        if let Some((_, name)) = TAGS.iter().find(|(t, _)| *t == tag) {
            match out.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = value,
                None => out.push((name, value)),
            }
        }
    }
    out
}

/// One JSON object of `figures`, padded with spaces to [`RECORD_LEN`] and ending in a newline.
pub fn record(figures: &[(&str, u64)]) -> Vec<u8> {
    let fields: Vec<String> = figures
        .iter()
        .map(|(n, v)| format!("\"{n}\":{v}"))
        .collect();
    let mut line = format!("{{{}}}", fields.join(",")).into_bytes();
    line.resize(RECORD_LEN - 1, b' ');
    line.push(b'\n');
    line
}

/// The stats queue's state: the buffer held, and where the figures go.
pub struct Stats {
    held: Option<u16>,
    out: Option<File>,
    warned: LogOnce,
}

impl Stats {
    pub fn new(out: Option<File>) -> Self {
        Stats {
            held: None,
            out,
            warned: LogOnce::default(),
        }
    }

    /// Takes what the driver posted: reads each buffer's figures and keeps the newest buffer
    /// (a second one, which a well-behaved driver never posts, returns the older); returns
    /// whether the driver needs an interrupt.
    pub fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DrainError> {
        let mut returned = false;
        while let Some(chain) = pop_chain(mem, queue)? {
            let head = chain.head_index();
            let bytes = SgList::new(chain, mem, false, QUEUE_SIZE.into(), MAX_BYTES)
                .map_err(|e| e.to_string())
                .and_then(|sg| {
                    let mut bytes = vec![0u8; sg.len as usize];
                    sg.read_into(mem, &mut bytes).map_err(|e| e.to_string())?;
                    Ok(bytes)
                });
            match bytes {
                Ok(bytes) => self.write(&record(&parse(&bytes))),
                Err(e) => warn_once!(
                    self.warned,
                    Problem::Chain,
                    "virtio-balloon: unreadable statistics: {e}"
                ),
            }
            if let Some(old) = self.held.replace(head) {
                queue.add_used(mem, old, 0).map_err(DrainError::Queue)?;
                returned = true;
            }
        }
        Ok(returned)
    }

    /// Returns the held buffer, which asks the driver for fresh figures; whether the driver
    /// needs an interrupt.
    pub fn request(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DrainError> {
        let Some(head) = self.held.take() else {
            return Ok(false);
        };
        queue.add_used(mem, head, 0).map_err(DrainError::Queue)?;
        Ok(true)
    }

    /// Whether the device keeps the driver's buffer: always the last one taken off the ring.
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// A reset driver has forgotten its buffer.
    pub fn reset(&mut self) {
        self.held = None;
    }

    fn write(&mut self, record: &[u8]) {
        let Some(out) = &self.out else {
            return;
        };
        if let Err(e) = out.write_all_at(record, 0) {
            warn_once!(
                self.warned,
                Problem::Io,
                "virtio-balloon: cannot write the statistics: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    }

    #[test]
    fn parses_known_tags_and_drops_the_rest() {
        let mut bytes: Vec<u8> = [(5, 1 << 30), (4, 1 << 20), (99, 7), (4, 2 << 20)]
            .iter()
            .flat_map(|(t, v)| entry(*t, *v))
            .collect();
        bytes.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            parse(&bytes),
            [("total_memory", 1 << 30), ("free_memory", 2 << 20)]
        );
    }

    #[test]
    fn a_record_is_one_fixed_size_json_line() {
        let r = record(&[("total_memory", 10), ("free_memory", 3)]);
        assert_eq!(r.len(), RECORD_LEN);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("{\"total_memory\":10,\"free_memory\":3}   "));
        assert!(text.ends_with(" \n"));
    }
}
