use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;

use super::super::test_utils::*;
use super::*;
use crate::virtio::block::test_utils::{mem, MEM_SIZE, R, W};
use crate::virtio::console::test_utils::{guest, BUF};
use crate::virtio::net::test_utils::Driver;

const FILL: u8 = 0xee;

fn receiver(mergeable: bool) -> Receiver {
    let mut rx = Receiver::new();
    rx.set_features(mergeable, true);
    rx
}

fn pumped(next: RxNext, notify: bool) -> Pumped {
    Pumped { next, notify }
}

/// `p` as the guest should see it: with `num_buffers` set.
fn with_num_buffers(p: &[u8], n: u16) -> Vec<u8> {
    let mut p = p.to_vec();
    p[NUM_BUFFERS_OFFSET..HDR_LEN].copy_from_slice(&n.to_le_bytes());
    p
}

/// Concatenates what the used entries say was written, buffer by buffer.
fn gathered(mem: &GuestMemoryMmap, parts: &[(u64, usize)]) -> Vec<u8> {
    parts
        .iter()
        .flat_map(|&(addr, len)| guest(mem, addr, len))
        .collect()
}

#[test]
fn single_chains_take_whole_frames() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    driver.post(&[(BUF, 1000, W), (BUF + 0x1000, 1000, W)]);
    driver.post(&[(BUF + 0x2000, 2000, W)]);
    let mut queue = driver.queue();
    let (mut tap, peer) = FakeTap::new();
    let (p, q) = (packet(0, 1500, 1), packet(0, 60, 2));
    peer.send(&p);
    peer.send(&q);
    let mut rx = receiver(false);
    // Both chains used: the TAP is left alone until the driver posts more.
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::WaitForBuffers, true));
    assert_eq!(driver.used(), vec![(0, 1512), (2, 72)]);
    let first = gathered(&mem, &[(BUF, 1000), (BUF + 0x1000, 512)]);
    assert_eq!(first, with_num_buffers(&p, 1));
    assert_eq!(guest(&mem, BUF + 0x2000, 72), with_num_buffers(&q, 1));
    assert_eq!((rx.frames(), rx.dropped()), (2, 0));
}

#[test]
fn merged_buffers_spread_a_frame_and_count_them() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    for i in 0..5 {
        driver.post(&[(BUF + i * 0x1000, 1000, W)]);
    }
    let mut queue = driver.queue();
    let (mut tap, peer) = FakeTap::new();
    let (p, q) = (packet(0, 2500, 3), packet(0, 100, 4));
    peer.send(&p);
    peer.send(&q);
    let mut rx = receiver(true);
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::Watch, true));
    assert_eq!(
        driver.used(),
        vec![(0, 1000), (1, 1000), (2, 512), (3, 112)]
    );
    let first = gathered(
        &mem,
        &[(BUF, 1000), (BUF + 0x1000, 1000), (BUF + 0x2000, 512)],
    );
    assert_eq!(first, with_num_buffers(&p, 3));
    assert_eq!(guest(&mem, BUF + 0x3000, 112), with_num_buffers(&q, 1));
    // The fifth chain stays with the device for the next frame.
    assert_eq!(queue.next_avail(), 5);
    assert_eq!(rx.reserved.len(), 1);
}

/// Merged buffers that together hold the largest frame several times over: 16 chains of
/// 8000 bytes, 8 KiB apart. Three frames come from the TAP: 20000 bytes, 20000 bytes marked
/// DATA_VALID, then 100.
fn big_merged_ring(vectored: bool) -> Received {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    for i in 0..16 {
        driver.post(&[(BUF + i * 0x2000, 8000, W)]);
    }
    let mut queue = driver.queue();
    let (mut tap, peer) = FakeTap::new();
    tap.vectored = vectored;
    peer.send(&packet(0, 20000, 4));
    peer.send(&packet(VIRTIO_NET_HDR_F_DATA_VALID as u8, 20000, 5));
    peer.send(&packet(0, 100, 6));
    let mut rx = Receiver::new();
    rx.set_features(true, false);
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::Watch, true));
    let second = gathered(
        &mem,
        &[
            (BUF + 0x6000, 8000),
            (BUF + 0x8000, 8000),
            (BUF + 0xa000, 4012),
        ],
    );
    Received {
        used: driver.used(),
        second,
        third: guest(&mem, BUF + 0xc000, 112),
        rx,
    }
}

/// What [`big_merged_ring`] saw: the used entries and the last two frames in guest memory.
struct Received {
    rx: Receiver,
    used: Vec<(u32, u32)>,
    second: Vec<u8>,
    third: Vec<u8>,
}

#[test]
fn after_a_large_frame_frames_go_straight_into_merged_buffers() {
    let Received {
        rx,
        used,
        second,
        third,
    } = big_merged_ring(true);
    let chains = [
        (0, 8000),
        (1, 8000),
        (2, 4012),
        (3, 8000),
        (4, 8000),
        (5, 4012),
    ];
    assert_eq!(used, [&chains[..], &[(6, 112)]].concat());
    // The device completes the header in guest memory: chains taken, no flags.
    let mut p = with_num_buffers(&packet(VIRTIO_NET_HDR_F_DATA_VALID as u8, 20000, 5), 3);
    p[0] = 0;
    assert_eq!(second, p);
    assert_eq!(third, with_num_buffers(&packet(0, 100, 6), 1));
    // Only the first frame, with none large before it, went through the host buffer.
    assert_eq!((rx.frames(), rx.copied(), rx.dropped()), (3, 1, 0));
    // The chains taken beyond the frames wait for the next one.
    assert_eq!(rx.reserved.len(), 8);
}

#[test]
fn a_host_side_without_scatter_reads_gets_the_same_frames_by_copy() {
    let direct = big_merged_ring(true);
    let copied = big_merged_ring(false);
    assert_eq!(
        (&copied.used, &copied.second, &copied.third),
        (&direct.used, &direct.second, &direct.third)
    );
    assert_eq!((copied.rx.frames(), copied.rx.copied()), (3, 3));
}

#[test]
fn without_buffers_frames_stay_in_the_tap() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    driver.post(&[(BUF, 100, W)]);
    let mut queue = driver.queue();
    queue.set_event_idx(true);
    let (mut tap, peer) = FakeTap::new();
    let (p, q) = (packet(0, 60, 5), packet(0, 200, 5));
    peer.send(&p);
    peer.send(&q);
    let mut rx = receiver(true);
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::WaitForBuffers, true));
    assert_eq!(driver.used(), vec![(0, 72)]);
    // The second frame was not taken off the TAP.
    assert_eq!(rx.pending, None);
    // The driver is asked to notify at its next buffer (avail_event after 16 used entries).
    assert_eq!(mem.read_obj::<u16>(driver.avail_event()).unwrap(), 1);
    // Pumping again without buffers changes nothing.
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::WaitForBuffers, false));
    driver.post(&[(BUF + 0x1000, 4096, W)]);
    driver.post(&[(BUF + 0x2000, 4096, W)]);
    // Having seen the first frame, the driver wants an interrupt for the next one.
    mem.write_obj(1u16, driver.used_event()).unwrap();
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::Watch, true));
    assert_eq!(driver.used(), vec![(0, 72), (1, 212)]);
    assert_eq!(guest(&mem, BUF + 0x1000, 212), with_num_buffers(&q, 1));
    assert_eq!((rx.frames(), rx.dropped()), (2, 0));
}

#[test]
fn a_frame_short_of_buffers_waits_for_more() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    driver.post(&[(BUF, 1000, W)]);
    let mut queue = driver.queue();
    let (mut tap, peer) = FakeTap::new();
    let p = packet(0, 2500, 6);
    peer.send(&p);
    let mut rx = receiver(true);
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::WaitForBuffers, false));
    assert!(driver.used().is_empty());
    assert_eq!(rx.pending, Some(p.len()));
    driver.post(&[(BUF + 0x1000, 1000, W)]);
    driver.post(&[(BUF + 0x2000, 1000, W)]);
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::WaitForBuffers, true));
    assert_eq!(driver.used(), vec![(0, 1000), (1, 1000), (2, 512)]);
    let all = gathered(
        &mem,
        &[(BUF, 1000), (BUF + 0x1000, 1000), (BUF + 0x2000, 512)],
    );
    assert_eq!(all, with_num_buffers(&p, 3));
    assert_eq!((rx.frames(), rx.dropped()), (1, 0));
}

#[test]
fn held_chains_are_given_back_only_if_taken_last_and_in_a_row() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    driver.post(&[(BUF, 1000, W)]);
    let mut queue = driver.queue();
    let (mut tap, peer) = FakeTap::new();
    let mut rx = receiver(true);
    assert_eq!(rx.held(queue.next_avail()), Some(0));
    // A chain waits for a frame.
    rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(rx.held(queue.next_avail()), Some(1));
    // A frame needs more: a chain too short for a header is returned between two held.
    peer.send(&packet(0, 2500, 6));
    driver.post(&[(BUF + 0x1000, 4, W)]);
    driver.post(&[(BUF + 0x2000, 1000, W)]);
    rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(driver.used(), vec![(1, 0)]);
    assert_eq!((queue.next_avail(), rx.reserved.len()), (3, 2));
    assert_eq!(rx.held(queue.next_avail()), None);
    // Once the frame is delivered, the next chain held is again the last taken.
    driver.post(&[(BUF + 0x3000, 1000, W)]);
    driver.post(&[(BUF + 0x4000, 1000, W)]);
    rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(driver.used().len(), 4);
    assert_eq!(rx.held(queue.next_avail()), Some(1));
}

#[test]
fn frames_too_big_for_a_chain_are_dropped_and_counted() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    driver.post(&[(BUF, 100, W)]);
    let mut queue = driver.queue();
    let (mut tap, peer) = FakeTap::new();
    let q = packet(0, 50, 7);
    peer.send(&packet(0, 200, 7));
    // A runt, then a frame that fits.
    peer.send(&[0; HDR_LEN + ETH_HLEN - 1]);
    peer.send(&q);
    let mut rx = receiver(false);
    rx.pump(&mem, &mut queue, &mut tap).unwrap();
    // The chain that was too small for the first frame took the third.
    assert_eq!(driver.used(), vec![(0, 62)]);
    assert_eq!(guest(&mem, BUF, 62), with_num_buffers(&q, 1));
    assert_eq!((rx.frames(), rx.dropped()), (1, 2));
}

#[test]
fn a_frame_bigger_than_the_whole_ring_is_dropped() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    let size = driver.queue().size();
    for i in 0..u64::from(size) {
        driver.post(&[(BUF + i * 0x100, 100, W)]);
    }
    let mut queue = driver.queue();
    let (mut tap, peer) = FakeTap::new();
    let q = packet(0, 50, 8);
    peer.send(&packet(0, 100 * usize::from(size), 8));
    peer.send(&q);
    let mut rx = receiver(true);
    rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(driver.used(), vec![(0, 62)]);
    assert_eq!(guest(&mem, BUF, 62), with_num_buffers(&q, 1));
    assert_eq!((rx.frames(), rx.dropped()), (1, 1));
}

#[test]
fn hostile_receive_chains_are_returned_empty() {
    let mem = mem();
    let top = MEM_SIZE as u64;
    mem.write_slice(&[FILL; 0x100], GuestAddress(BUF)).unwrap();
    let mut driver = Driver::new(&mem, 0);
    // Device-readable, mixed, outside memory, no room for the header, a loop (5 → 6 → 6).
    driver.post(&[(BUF, 100, R)]);
    driver.post(&[(BUF, 50, W), (BUF + 50, 50, R)]);
    driver.post(&[(top - 50, 100, W)]);
    driver.post(&[(BUF, (HDR_LEN - 1) as u32, W)]);
    driver.post(&[(BUF, 50, W), (BUF + 50, 50, W)]);
    let looped = Descriptor::new(BUF + 50, 50, (VRING_DESC_F_NEXT | W as u32) as u16, 6);
    driver
        .mock
        .desc_table()
        .store(6, RawDescriptor::from(looped))
        .unwrap();
    driver.post(&[(BUF + 0x1000, 100, W)]);
    let mut queue = driver.queue();
    let (mut tap, peer) = FakeTap::new();
    let p = packet(0, 60, 9);
    peer.send(&p);
    let mut rx = receiver(true);
    rx.pump(&mem, &mut queue, &mut tap).unwrap();
    let want = vec![(0, 0), (1, 0), (3, 0), (4, 0), (5, 0), (7, 72)];
    assert_eq!(driver.used(), want);
    assert_eq!(guest(&mem, BUF, 0x100), vec![FILL; 0x100]);
    assert_eq!(guest(&mem, BUF + 0x1000, 72), with_num_buffers(&p, 1));
    assert_eq!((rx.frames(), rx.dropped()), (1, 0));
}

#[test]
fn checksum_flags_reach_only_drivers_that_asked() {
    let mem = mem();
    let flags = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    for guest_csum in [false, true] {
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 100, W)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        peer.send(&packet(flags, 60, 0));
        let mut rx = Receiver::new();
        rx.set_features(false, guest_csum);
        rx.pump(&mem, &mut queue, &mut tap).unwrap();
        let want = if guest_csum { flags } else { 0 };
        assert_eq!(guest(&mem, BUF, 1), [want]);
    }
}

#[test]
fn event_idx_decides_the_interrupt() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    driver.post(&[(BUF, 100, W)]);
    driver.post(&[(BUF + 0x100, 100, W)]);
    let mut queue = driver.queue();
    queue.set_event_idx(true);
    let used_event = driver.used_event();
    let (mut tap, peer) = FakeTap::new();
    let mut rx = receiver(true);
    // The driver wants an interrupt only after the fifth frame: none for the first.
    mem.write_obj(4u16, used_event).unwrap();
    peer.send(&packet(0, 60, 0));
    assert!(!rx.pump(&mem, &mut queue, &mut tap).unwrap().notify);
    // Now at the next used entry (the second one, index 1).
    mem.write_obj(1u16, used_event).unwrap();
    peer.send(&packet(0, 60, 0));
    assert!(rx.pump(&mem, &mut queue, &mut tap).unwrap().notify);
    assert_eq!(driver.used().len(), 2);
}

#[test]
fn tap_failures_cost_a_frame_or_stop_the_receiver() {
    struct Failing(FakeTap, i32);
    impl std::os::fd::AsRawFd for Failing {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.as_raw_fd()
        }
    }
    impl TapIo for Failing {
        fn read_frame(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(self.1))
        }
        fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write_frame(buf)
        }
        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            self.0.set_offload(flags)
        }
    }
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    driver.post(&[(BUF, 100, W)]);
    let mut queue = driver.queue();
    let mut rx = receiver(true);
    // An oversized frame: dropped, and the next read (of the same failing tap) too, until
    // the budget ends the call.
    let mut tap = Failing(FakeTap::new().0, libc::EFAULT);
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::Watch, false));
    assert_eq!(rx.dropped(), RX_BUDGET as u64);
    // The interface was deleted: stop.
    let mut tap = Failing(FakeTap::new().0, libc::EBADFD);
    let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
    assert_eq!(got, pumped(RxNext::Stop, false));
    // The chain is still reserved for when frames come again.
    assert!(driver.used().is_empty());
}

#[test]
fn reset_forgets_chains_and_counts_the_pending_frame() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    driver.post(&[(BUF, 100, W)]);
    let mut queue = driver.queue();
    let (mut tap, peer) = FakeTap::new();
    peer.send(&packet(0, 500, 0));
    let mut rx = receiver(true);
    assert_eq!(
        rx.pump(&mem, &mut queue, &mut tap).unwrap().next,
        RxNext::WaitForBuffers
    );
    rx.reset();
    assert_eq!((rx.pending, rx.reserved.len(), rx.dropped()), (None, 0, 1));
}

#[test]
fn bogus_avail_index_does_not_spin() {
    let mem = mem();
    let mut driver = Driver::new(&mem, 0);
    driver.post(&[(BUF, 100, W)]);
    driver.mock.avail().idx().store(1000);
    let mut queue = driver.queue();
    let (mut tap, _peer) = FakeTap::new();
    assert!(matches!(
        receiver(true).pump(&mem, &mut queue, &mut tap),
        Err(RxError::BrokenRing)
    ));
}
