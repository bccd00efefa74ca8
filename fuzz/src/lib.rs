//! Scaffolding shared by rvmm's fuzz targets (`fuzz_targets/*.rs`).
//!
//! The queue-driven targets treat the fuzz input as the guest: after one control byte, the
//! input is copied into a small guest memory that holds split-virtqueue rings at fixed
//! addresses and the buffers they point to. Every descriptor field, ring index and request
//! header is therefore under the fuzzer's control, exactly as under a hostile guest driver.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

/// Size of the fuzzed guest memory: small, so random descriptor addresses often land inside.
pub const MEM_SIZE: usize = 0x1_0000;
/// Queue `i`'s rings start at `i * QUEUE_STRIDE`: descriptor table, then the avail ring at
/// +0x100, then the used ring at +0x200 (room for [`QUEUE_MAX`] entries each).
pub const QUEUE_STRIDE: u64 = 0x400;
/// Largest queue size a control byte selects.
pub const QUEUE_MAX: u16 = 16;
const AVAIL_OFFSET: u64 = 0x100;
const USED_OFFSET: u64 = 0x200;

/// A guest built from one fuzz input: memory plus the control byte's queue settings.
pub struct FuzzGuest {
    /// Guest memory holding the rings and buffers.
    pub mem: GuestMemoryMmap,
    /// The control byte (input byte 0); bits 0-2 and 7 are taken by [`FuzzGuest::queue`],
    /// the rest are free for the target.
    pub control: u8,
}

impl FuzzGuest {
    /// Splits off the control byte and copies the rest of `data` to guest address 0; `None`
    /// for an empty input.
    pub fn new(data: &[u8]) -> Option<Self> {
        let (&control, image) = data.split_first()?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("mapping fuzz guest memory");
        let image = &image[..image.len().min(MEM_SIZE)];
        vm_memory::Bytes::write_slice(&mem, image, GuestAddress(0))
            .expect("the image fits in guest memory");
        Some(Self { mem, control })
    }

    /// Queue `index` as a transport hands it to a device after the driver set it up: size
    /// 1 to 16 from control bits 0-2, EVENT_IDX from bit 7.
    pub fn queue(&self, index: u64) -> Queue {
        let base = index * QUEUE_STRIDE;
        let size = 1u16 << (self.control & 0x7).min(4);
        let mut queue = Queue::new(QUEUE_MAX).expect("valid queue max size");
        let set = [
            queue.try_set_size(size),
            queue.try_set_desc_table_address(GuestAddress(base)),
            queue.try_set_avail_ring_address(GuestAddress(base + AVAIL_OFFSET)),
            queue.try_set_used_ring_address(GuestAddress(base + USED_OFFSET)),
        ];
        assert!(set.iter().all(Result::is_ok), "fixed queue layout is valid");
        queue.set_event_idx(self.control & 0x80 != 0);
        queue.set_ready(true);
        queue
    }

    /// Control bit `n` (3 to 6 are free for targets).
    pub fn flag(&self, n: u8) -> bool {
        self.control & (1 << n) != 0
    }
}

/// An anonymous in-memory file of `len` bytes: a disk image without touching the file system.
pub fn memfd(len: u64) -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; the call only creates a descriptor.
    let fd = unsafe { libc::memfd_create(c"rvmm-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// Where targets keep scratch files and sockets: tmpfs when there is one, since rewriting a
/// truncated file on a disk file system (ext4's `auto_da_alloc`) costs real I/O per input.
pub fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A scratch file named after `what`, removed on drop.
pub fn scratch_file(what: &str) -> TempFile {
    TempFile::new_with_prefix(scratch_dir().join(format!("rvmm-fuzz-{what}")))
        .expect("creating a scratch file")
}

/// Ignores SIGPIPE, as Rust's runtime does before `main` in rvmm's own binaries (libFuzzer's
/// `main` skips that): a write to a socket whose peer is gone then fails with `EPIPE` instead
/// of killing the fuzzer.
pub fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SIG_IGN installs no handler code; only the disposition of SIGPIPE changes.
        let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        assert_ne!(old, libc::SIG_ERR, "ignoring SIGPIPE");
    });
}
