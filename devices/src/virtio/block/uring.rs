//! Asynchronous disk I/O on io_uring: reads, writes and flushes are queued as the driver's
//! requests are popped, many in flight at once, and their completions come back through an
//! eventfd the event loop watches.
//!
//! The ring is locked down before use (`IORING_REGISTER_RESTRICTIONS`): it accepts only READV,
//! WRITEV and FSYNC, only on the registered disk files, so the `io_uring_enter` that the
//! seccomp filters allow cannot reach anything else.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::GuestAddress;

use crate::virtio::iovec::advance;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What an in-flight request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Read,
    Write,
    Flush,
}

/// A finished request: its head, where its status byte goes, and the used length or the error.
#[derive(Debug)]
pub(super) struct Completed {
    pub(super) head: u16,
    pub(super) status: GuestAddress,
    pub(super) result: io::Result<u32>,
}

/// A request to queue, kept in its head's slot until it completes.
#[derive(Debug)]
pub(super) struct Submission {
    /// The descriptor chain's head index: unique among the chains the device holds.
    pub(super) head: u16,
    pub(super) op: Op,
    /// Index of the file in [`Uring::new`]'s list.
    pub(super) file: u32,
    pub(super) status: GuestAddress,
    /// Guest buffers (host addresses) still to transfer; the kernel reads this array, so it
    /// lives here until completion.
    pub(super) iovecs: Vec<libc::iovec>,
    pub(super) offset: u64,
    /// Bytes the driver gets as the used length when the request succeeds.
    pub(super) used: u32,
}

// SAFETY: the iovecs point into guest memory, which every thread may access volatilely; the
// pointers are only handed to the kernel.
unsafe impl Send for Submission {}

/// An io_uring serving one queue of `slots` entries.
pub(super) struct Uring {
    ring: IoUring,
    done: EventFd,
    slots: Vec<Option<Submission>>,
    in_flight: usize,
    cqes: Vec<(u64, i32)>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Uring {
    /// A ring for a queue of `slots` entries, restricted to I/O on `files`.
    pub(super) fn new(slots: u16, files: &[RawFd]) -> io::Result<Self> {
        let entries = u32::from(slots).next_power_of_two();
        let ring = IoUring::builder().setup_r_disabled().build(entries)?;
        let done = EventFd::new(EFD_NONBLOCK)?;
        let submitter = ring.submitter();
        submitter.register_files(files)?;
        submitter.register_eventfd(done.as_raw_fd())?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        let mut rules = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_required(fixed),
            Restriction::sqe_flags_allowed(fixed | squeue::Flags::IO_DRAIN.bits()),
        ];
        submitter.register_restrictions(&mut rules)?;
        submitter.register_enable_rings()?;
        Ok(Self {
            ring,
            done,
            slots: (0..slots).map(|_| None).collect(),
            in_flight: 0,
            cqes: Vec::with_capacity(usize::from(slots)),
        })
    }

    /// Signalled at every completion. Nothing here reads it: watch it edge-triggered (or read
    /// it before reaping).
    pub(super) fn completion_event(&self) -> &EventFd {
        &self.done
    }

    /// Requests queued and not yet reaped.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a request (sent to the kernel by [`Uring::submit`]). A flush starts only after
    /// every request queued before it has completed. Gives the request back if its head is
    /// already in flight or the ring is full.
    pub(super) fn push(&mut self, sub: Submission) -> Result<(), Submission> {
        let head = usize::from(sub.head);
        if self.slots.get(head).is_none_or(Option::is_some) {
            return Err(sub);
        }
        if self.queue(&sub).is_err() {
            return Err(sub);
        }
        self.slots[head] = Some(sub);
        self.in_flight += 1;
        Ok(())
    }

    /// Puts one SQE for `request` on the submission queue.
    fn queue(&mut self, request: &Submission) -> Result<(), squeue::PushError> {
        let file = types::Fixed(request.file);
        let iov = request.iovecs.as_ptr();
        // At most the queue size, as chains are.
        let count = request.iovecs.len() as u32;
        let entry = match request.op {
            Op::Read => opcode::Readv::new(file, iov, count)
                .offset(request.offset)
                .build(),
            Op::Write => opcode::Writev::new(file, iov, count)
                .offset(request.offset)
                .build(),
            Op::Flush => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        };
        let entry = entry
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(request.head.into());
        // SAFETY: the iovecs outlive the operation in the request's slot until it is reaped,
        // and guest memory stays mapped until the device has waited for it (`wait_idle`).
        unsafe { self.ring.submission().push(&entry) }
    }

    /// Sends the queued requests to the kernel.
    pub(super) fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                res => return res.map(drop),
            }
        }
    }

    /// Collects finished requests into `out`. A short read or write goes back on the ring for
    /// its remainder; a read that hits the end of the file is an I/O error.
    pub(super) fn reap(&mut self, out: &mut Vec<Completed>) -> io::Result<()> {
        let mut requeued = false;
        loop {
            self.cqes.clear();
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            if self.cqes.is_empty() {
                break;
            }
            for i in 0..self.cqes.len() {
                let (user_data, result) = self.cqes[i];
                requeued |= self.finish(user_data, result, out);
            }
        }
        if requeued {
            self.submit()?;
        }
        Ok(())
    }

    /// Handles one completion; returns whether the request went back on the ring.
    fn finish(&mut self, user_data: u64, result: i32, out: &mut Vec<Completed>) -> bool {
        let head = user_data as u16;
        let Some(mut request) = self.slots.get_mut(usize::from(head)).and_then(Option::take) else {
            return false;
        };
        let result = match usize::try_from(result) {
            Err(_) => Err(io::Error::from_raw_os_error(-result)),
            Ok(_) if request.op == Op::Flush => Ok(request.used),
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                advance(&mut request.iovecs, n);
                if request.iovecs.is_empty() {
                    Ok(request.used)
                } else {
                    request.offset += n as u64;
                    if self.queue(&request).is_ok() {
                        self.slots[usize::from(head)] = Some(request);
                        return true;
                    }
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }
        };
        self.in_flight -= 1;
        out.push(Completed {
            head,
            status: request.status,
            result,
        });
        false
    }

    /// Waits until no request is in flight, dropping their results: before the queue is
    /// reset or guest memory goes away.
    pub(super) fn wait_idle(&mut self) {
        let mut dropped = Vec::new();
        while self.in_flight > 0 {
            let _ = self.submit();
            match self.ring.submitter().submit_and_wait(1) {
                Err(e) if e.raw_os_error() != Some(libc::EINTR) => break,
                _ => {}
            }
            if self.reap(&mut dropped).is_err() {
                break;
            }
            dropped.clear();
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.wait_idle();
    }
}
