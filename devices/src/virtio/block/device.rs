//! The virtio-blk device: image set-up, configuration space, feature negotiation and the
//! event-loop glue that runs the handler when the driver notifies the queue.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{info, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::handler::{BlockHandler, DirectIo};
use super::{ID_BYTES, MAX_RANGES, MAX_RANGE_SECTORS, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, SIZE_MAX};
use crate::snapshot::SnapshotError;
use crate::virtio::common::{read_config_bytes, VirtioCommon};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::Problem;

/// Length of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
const CONFIG_LEN: usize = 60;

/// How to back a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Image file or host block device.
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// GET_ID answer (at most 20 bytes); derived from the image's inode when absent.
    pub serial: Option<String>,
    /// Open with O_DIRECT, bypassing the host's page cache.
    pub direct: bool,
}

/// Errors setting up a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process (or device) holds a conflicting lock on the image.
    #[error("disk image {} is in use by another VM or process (locked)", path.display())]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// Locking or sizing the image failed.
    #[error("cannot inspect disk image {}", path.display())]
    Inspect {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The serial does not fit the 20-byte GET_ID answer.
    #[error("disk serial {0:?} is longer than 20 bytes")]
    SerialTooLong(String),
    /// The image's file system takes no direct I/O.
    #[error("disk image {} does not support direct I/O (direct=on)", path.display())]
    NoDirectIo {
        /// The image.
        path: PathBuf,
    },
    /// The queue EventFd could not be created.
    #[error("cannot create the queue eventfd")]
    EventFd(#[source] io::Error),
}

/// A virtio-blk device.
pub struct Block {
    handler: BlockHandler,
    config_space: [u8; CONFIG_LEN],
    avail_features: u64,
    common: VirtioCommon<1>,
}

impl Block {
    /// Opens and locks the image (exclusively, or shared when read-only) and sizes the disk.
    pub fn new(cfg: BlockConfig) -> Result<Self, BlockError> {
        let id = device_id(&cfg)?;
        let path = &cfg.path;
        let mut disk = open(&cfg, cfg.direct)?;
        let inspect = |source| BlockError::Inspect {
            path: path.clone(),
            source,
        };
        // Two VMs writing one image corrupt it; readers may share.
        let locked = if cfg.read_only {
            disk.try_lock_shared()
        } else {
            disk.try_lock()
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(BlockError::Locked { path: path.clone() }),
            Err(TryLockError::Error(e)) => return Err(inspect(e)),
        }
        // Seeking works for regular files and block devices alike (metadata length is 0 for
        // the latter).
        let size = disk.seek(SeekFrom::End(0)).map_err(inspect)?;
        let capacity = size / SECTOR_SIZE;
        if size % SECTOR_SIZE != 0 {
            info!(
                "virtio-blk: {} is not a multiple of 512 bytes; its last {} bytes are not visible",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let id = match id {
            Some(id) => id,
            None => inode_id(&disk).map_err(inspect)?,
        };
        let mut handler = BlockHandler::new(disk, capacity, cfg.read_only, id);
        if cfg.direct {
            handler.set_direct(direct_io(&cfg, &handler)?);
        }
        if let Err(e) = handler.enable_io_uring() {
            info!("virtio-blk: io_uring unavailable ({e}); serving requests synchronously");
        }
        Ok(Self {
            handler,
            config_space: config_space(capacity),
            avail_features: features(cfg.read_only),
            common: VirtioCommon::new("virtio-blk", QUEUE_SIZE).map_err(BlockError::EventFd)?,
        })
    }
}

/// Opens the image as configured, with O_DIRECT when `direct`.
fn open(cfg: &BlockConfig, direct: bool) -> Result<File, BlockError> {
    let path = &cfg.path;
    let flags = if direct { libc::O_DIRECT } else { 0 };
    OpenOptions::new()
        .read(true)
        .write(!cfg.read_only)
        .custom_flags(flags)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EINVAL) if direct => BlockError::NoDirectIo { path: path.clone() },
            _ => BlockError::Open {
                path: path.clone(),
                source,
            },
        })
}

/// A direct disk's alignment needs (statx's DIOALIGN, 512 bytes where the kernel does not
/// say) and its buffered twin for the requests that miss them.
fn direct_io(cfg: &BlockConfig, handler: &BlockHandler) -> Result<DirectIo, BlockError> {
    let (mem_align, offset_align) =
        handler
            .dio_alignment()
            .map_err(|source| BlockError::Inspect {
                path: cfg.path.clone(),
                source,
            })?;
    if offset_align == 0 {
        return Err(BlockError::NoDirectIo {
            path: cfg.path.clone(),
        });
    }
    Ok(DirectIo {
        buffered: open(cfg, false)?,
        mem_align,
        offset_align,
    })
}

/// The configured serial as a NUL-padded GET_ID answer.
fn device_id(cfg: &BlockConfig) -> Result<Option<[u8; ID_BYTES]>, BlockError> {
    let Some(serial) = &cfg.serial else {
        return Ok(None);
    };
    if serial.len() > ID_BYTES {
        return Err(BlockError::SerialTooLong(serial.clone()));
    }
    let mut id = [0u8; ID_BYTES];
    id[..serial.len()].copy_from_slice(serial.as_bytes());
    Ok(Some(id))
}

/// A serial that stays the same for the same image across runs: its device and inode numbers.
fn inode_id(disk: &File) -> io::Result<[u8; ID_BYTES]> {
    let meta = disk.metadata()?;
    let text = format!("{:x}{:x}", meta.dev(), meta.ino());
    let mut id = [0u8; ID_BYTES];
    let n = text.len().min(ID_BYTES);
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    Ok(id)
}

fn features(read_only: bool) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ];
    if read_only {
        bits.push(VIRTIO_BLK_F_RO);
    } else {
        bits.extend([VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
    }
    bits.into_iter().fold(0, |acc, bit| acc | 1 << bit)
}

/// `struct virtio_blk_config` (virtio 1.1, 5.2.4); fields of features not offered stay zero.
fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| c[offset..][..bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_RANGES.to_le_bytes()); // max_discard_seg
    put(44, &1u32.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, _features: u64) {
        // Nothing to adapt: EVENT_IDX is applied by the transport, and the other features only
        // change which requests the driver sends.
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and CONFIG_WCE is not offered.
        self.common.ignore_config_write(offset, data);
    }

    fn queue_events(&self) -> &[EventFd] {
        self.common.queue_events()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.common.activate(mem, queues, interrupt)
    }

    fn reset(&mut self) -> bool {
        // The kernel may still be writing into the queue's buffers.
        self.handler.wait_idle();
        self.common.reset();
        true
    }

    fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        // A request on io_uring is neither available nor used: only its completion can
        // answer it, and that belongs to this process.
        if self.handler.in_flight() > 0 {
            return Err(SnapshotError::Busy("virtio-blk"));
        }
        self.common.queue_positions()
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.common.queue_event(events.fd()).is_some() {
            self.common.serve(Problem::Queue, "", |mem, [queue]| {
                self.handler.process_queue(mem, queue)
            });
        } else if self.common.is_active() {
            self.common.serve(Problem::Io, "", |mem, [queue]| {
                self.handler.process_completions(mem, queue)
            });
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_queue_events(ops);
        if let Some(done) = self.handler.completion_event() {
            // Edge-triggered: every completion signals it, and nothing needs to read it.
            let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::new(done, set)) {
                warn!("virtio-blk: cannot watch the io_uring completions: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN};
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use virtio_bindings::virtio_mmio::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_utils::*;
    use super::*;
    use crate::bus::BusDevice;
    use crate::interrupt::EventFdInterrupt;
    use crate::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
    use crate::virtio::net::test_utils::Driver;
    use crate::virtio::test_utils::{notify_queue, run_until_idle, CountingInterrupt};

    fn config(path: &std::path::Path, read_only: bool) -> BlockConfig {
        BlockConfig {
            path: path.to_path_buf(),
            read_only,
            serial: None,
            direct: false,
        }
    }

    fn read_config_u32(block: &Block, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        block.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn capacity_rounds_down_and_config_space_is_filled() {
        let image = image(3);
        image.as_file().set_len(3 * 512 + 100).unwrap();
        let block = Block::new(config(image.as_path(), false)).unwrap();
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 3);
        assert_eq!(read_config_u32(&block, 8), SIZE_MAX);
        assert_eq!(read_config_u32(&block, 12), SEG_MAX);
        assert_eq!(read_config_u32(&block, 20), 512);
        assert_eq!(read_config_u32(&block, 36), MAX_RANGE_SECTORS);
        assert_eq!(read_config_u32(&block, 40), MAX_RANGES);
        assert_eq!(read_config_u32(&block, 56), 1);
        // Past the end, and at absurd offsets, config space reads as zero.
        let mut tail = [0xffu8; 8];
        block.read_config(56, &mut tail);
        assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(read_config_u32(&block, u64::MAX), 0);
    }

    #[test]
    fn features_follow_read_only() {
        let image = image(1);
        let rw = Block::new(config(image.as_path(), false)).unwrap();
        let has = |b: &Block, bit: u32| b.avail_features() & (1 << bit) != 0;
        assert!(has(&rw, VIRTIO_F_VERSION_1) && has(&rw, VIRTIO_BLK_F_FLUSH));
        assert!(has(&rw, VIRTIO_BLK_F_DISCARD) && has(&rw, VIRTIO_BLK_F_WRITE_ZEROES));
        assert!(!has(&rw, VIRTIO_BLK_F_RO));
        drop(rw);
        let ro = Block::new(config(image.as_path(), true)).unwrap();
        assert!(has(&ro, VIRTIO_BLK_F_RO) && has(&ro, VIRTIO_BLK_F_SEG_MAX));
        assert!(!has(&ro, VIRTIO_BLK_F_DISCARD));
        assert_eq!(ro.device_type(), VIRTIO_ID_BLOCK);
        assert_eq!(ro.queue_max_sizes(), &[QUEUE_SIZE]);
    }

    #[test]
    fn images_are_locked() {
        let image = image(1);
        let writer = Block::new(config(image.as_path(), false)).unwrap();
        for read_only in [false, true] {
            let err = Block::new(config(image.as_path(), read_only))
                .err()
                .unwrap();
            assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        }
        drop(writer);
        let r1 = Block::new(config(image.as_path(), true)).unwrap();
        let _r2 = Block::new(config(image.as_path(), true)).unwrap();
        let err = Block::new(config(image.as_path(), false)).err().unwrap();
        assert!(matches!(err, BlockError::Locked { .. }));
        drop(r1);
    }

    #[test]
    fn bad_configs_are_refused() {
        let err = Block::new(config("/nonexistent/disk.img".as_ref(), false))
            .err()
            .unwrap();
        assert!(matches!(err, BlockError::Open { .. }));
        let image = image(1);
        let mut cfg = config(image.as_path(), false);
        cfg.serial = Some("x".repeat(21));
        let err = Block::new(cfg).err().unwrap();
        assert!(matches!(err, BlockError::SerialTooLong(_)));
    }

    fn w(t: &mut MmioTransport, reg: u32, v: u32) {
        t.write(reg.into(), &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(reg.into(), &mut b);
        u32::from_le_bytes(b)
    }

    /// A read from a FIFO stays on io_uring until the test writes into the FIFO: the device
    /// cannot be saved until then.
    #[test]
    fn a_request_in_flight_makes_the_device_busy() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/rvmm-blk-").unwrap();
        let path = dir.as_path().join("fifo");
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo only creates the file.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Read-write, so that opening blocks on no writer.
        let fifo = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut writer = fifo.try_clone().unwrap();
        let mut handler = BlockHandler::new(fifo, 8, false, [0; ID_BYTES]);
        if handler.enable_io_uring().is_err() {
            // Without io_uring every request is answered at once.
            return;
        }
        let block = Arc::new(Mutex::new(Block {
            handler,
            config_space: config_space(8),
            avail_features: features(false),
            common: VirtioCommon::new("virtio-blk", QUEUE_SIZE).unwrap(),
        }));
        let mem = mem();
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(block.clone());
        let mut driver = Driver::new(&mem, 0);
        let line = Arc::new(CountingInterrupt::default());
        let interrupt = Arc::new(VirtioInterrupt::new(line));
        let queues = vec![driver.queue()];
        block
            .lock()
            .unwrap()
            .activate(mem.clone(), queues, interrupt)
            .unwrap();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        driver.post(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        notify_queue(&block, 0);
        run_until_idle(&mut manager);
        let err = block.lock().unwrap().queue_positions().unwrap_err();
        assert_eq!(err.to_string(), "virtio-blk has requests in flight");

        writer.write_all(&pattern(0, 512)).unwrap();
        run_until_idle(&mut manager);
        assert_eq!(driver.used(), [(0, 513)]);
        assert_eq!(block.lock().unwrap().queue_positions().unwrap(), [(1, 1)]);
    }

    const USED: u64 = 0x800;

    /// Plays the Linux driver against transport + device + event loop.
    #[test]
    fn driver_reads_a_sector_through_the_event_loop() {
        let image = image(8);
        let mut cfg = config(image.as_path(), false);
        cfg.serial = Some("rvmm-disk".into());
        let block = Arc::new(Mutex::new(Block::new(cfg).unwrap()));
        let mem = mem();
        let irq = Arc::new(EventFdInterrupt::new().unwrap());
        let mut t = MmioTransport::new(mem.clone(), block.clone(), irq.clone()).unwrap();
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(block.clone());

        let mock = MockSplitQueue::new(&mem, 16);
        let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        w(&mut t, VIRTIO_MMIO_STATUS, status);
        status |= VIRTIO_CONFIG_S_DRIVER;
        w(&mut t, VIRTIO_MMIO_STATUS, status);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, high);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(
            &mut t,
            VIRTIO_MMIO_DRIVER_FEATURES,
            1 << VIRTIO_RING_F_EVENT_IDX,
        );
        status |= VIRTIO_CONFIG_S_FEATURES_OK;
        w(&mut t, VIRTIO_MMIO_STATUS, status);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), status);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(
            &mut t,
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            mock.desc_table_addr().0 as u32,
        );
        w(
            &mut t,
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            mock.avail_addr().0 as u32,
        );
        // MockSplitQueue's own used ring overlaps the tail of its avail ring, where
        // `used_event` lives; put the used ring clear of both.
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        status |= VIRTIO_CONFIG_S_DRIVER_OK;
        w(&mut t, VIRTIO_MMIO_STATUS, status);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), status);

        // Capacity through the transport's config window.
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);

        let serve = |t: &mut MmioTransport, manager: &mut EventManager<_>, descs| {
            mock.add_desc_chains(&raw_chain(descs, 0), 0).unwrap();
            // With EVENT_IDX the driver asks for an interrupt at the next used entry
            // (`used_event`, right after the avail ring).
            let used_event = mock.avail_addr().0 + 4 + 2 * 16;
            let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
            mem.write_obj(used_idx, GuestAddress(used_event)).unwrap();
            // No ioeventfd here: the write reaches the transport, which signals the queue.
            w(t, QUEUE_NOTIFY_OFFSET as u32, 0);
            // The queue event, then (on io_uring) the completion, unless it completed during
            // the submission.
            let mut interrupts = None;
            for _ in 0..2 {
                assert!(manager.run_with_timeout(1000).unwrap() >= 1);
                interrupts = irq.eventfd().read().ok();
                if interrupts.is_some() {
                    break;
                }
            }
            assert_eq!(interrupts, Some(1));
            assert_eq!(r(t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
            w(t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
        };
        header(&mem, VIRTIO_BLK_T_IN, 7);
        let descs = [(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)];
        assert_eq!(serve(&mut t, &mut manager, &descs), VIRTIO_BLK_S_OK as u8);
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, pattern(7 * 512, 512));

        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let descs = [(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)];
        assert_eq!(serve(&mut t, &mut manager, &descs), VIRTIO_BLK_S_OK as u8);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"rvmm-disk\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2);

        // After a reset, notifications are drained and ignored.
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        block.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
        assert!(irq.eventfd().read().is_err());
    }
}
