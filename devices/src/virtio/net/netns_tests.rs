//! End to end through a real TAP, inside a private network namespace so that no frame can
//! leave the test. Skipped (with a note on stderr) where /dev/net/tun is missing or namespaces
//! cannot be created (no root).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::rx::{Receiver, RxNext};
use super::tap::{ifreq, set_iff, TUN_PATH};
use super::test_utils::Driver;
use super::tx::Transmitter;
use super::{Net, NetConfig, Tap, TapError, HDR_LEN};
use crate::virtio::block::test_utils::{mem, R, W};
use crate::virtio::console::test_utils::{guest, BUF};
use crate::virtio::VirtioDevice;

const NAME: &str = "rvmmtap0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const HOST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
/// IEEE 802 local experimental EtherType: nothing in the kernel answers it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// Runs `f` on a thread in a fresh network namespace, which disappears with the thread and
/// everything in it; `None` when the host does not allow that.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    if !Path::new(TUN_PATH).exists() {
        eprintln!("skipped: no {TUN_PATH}");
        return None;
    }
    std::thread::spawn(move || {
        // SAFETY: unshare takes a flag word and only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            eprintln!("skipped: cannot create a network namespace: {e}");
            return None;
        }
        Some(f())
    })
    .join()
    .unwrap()
}

fn cname(name: &str) -> CString {
    CString::new(name).unwrap()
}

/// What `ip tuntap add NAME mode tap` does.
fn create_tap(name: &str) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_PATH)
        .unwrap();
    set_iff(&file, &cname(name), libc::IFF_TAP | libc::IFF_NO_PI).unwrap();
    // SAFETY: TUNSETPERSIST takes its argument by value.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    assert_eq!(ret, 0, "{}", io::Error::last_os_error());
}

fn socket(domain: i32, kind: i32, protocol: i32) -> OwnedFd {
    // SAFETY: socket only takes integers.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "{}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What `ip link set NAME up` does.
fn link_up(name: &str) {
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    let mut req = ifreq(&cname(name));
    // SAFETY: SIOCGIFFLAGS fills the flags of the `ifreq` it is given.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    assert_eq!(ret, 0, "{}", io::Error::last_os_error());
    // SAFETY: SIOCGIFFLAGS set the union's `flags` member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the `ifreq` it is given.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    assert_eq!(ret, 0, "{}", io::Error::last_os_error());
}

/// The host's side of the TAP: a packet socket on its interface.
struct Wire(OwnedFd);

impl Wire {
    fn bind(name: &str) -> Self {
        let all = (libc::ETH_P_ALL as u16).to_be();
        let sock = socket(libc::AF_PACKET, libc::SOCK_RAW, all.into());
        // SAFETY: `sockaddr_ll` is plain integers and arrays; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        // SAFETY: the name is NUL-terminated and outlives the call.
        addr.sll_ifindex = unsafe { libc::if_nametoindex(cname(name).as_ptr()) } as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `addr` is a `sockaddr_ll` of `len` bytes, valid for the call.
        let ret = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        assert_eq!(ret, 0, "{}", io::Error::last_os_error());
        Self(sock)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: the kernel reads `frame.len()` bytes from `frame`.
        let ret = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(ret, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// The next frame from `src` with our EtherType, waiting up to a second; the kernel's own
    /// chatter (IPv6 neighbour discovery and such) is skipped.
    fn recv_from(&self, src: [u8; 6]) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
            let ret = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match usize::try_from(ret) {
                Ok(n) if buf[6..12] == src && buf[12..14] == ETHERTYPE => return buf[..n].to_vec(),
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        panic!("no frame from {src:x?} on {NAME}");
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst);
    f.extend(src);
    f.extend(ETHERTYPE);
    f.extend((0..payload).map(|i| (i * 13 % 256) as u8));
    f
}

/// Pumps until a frame from `src` with our EtherType lands in one of the driver's buffers
/// (at `BUF + i * 0x1000`, one chain each); returns it without its header.
fn receive_from(
    src: [u8; 6],
    mem: &GuestMemoryMmap,
    driver: &Driver,
    rx: &mut Receiver,
    tap: &mut Tap,
) -> Vec<u8> {
    let mut queue = driver.queue();
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        rx.pump(mem, &mut queue, tap).unwrap();
        for (head, len) in driver.used() {
            let packet = guest(mem, BUF + u64::from(head) * 0x1000, len as usize);
            let f = &packet[HDR_LEN..];
            if f[6..12] == src && f[12..14] == ETHERTYPE {
                return f.to_vec();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no frame from {src:x?} reached the guest");
}

#[test]
fn frames_cross_a_real_tap() {
    in_netns(|| {
        create_tap(NAME);
        // The kernel accepts the offloads, so the device offers them to the guest.
        let net = Net::new(NetConfig {
            tap: NAME.into(),
            mac: Some(GUEST_MAC),
        })
        .unwrap();
        let offloads = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4;
        assert_eq!(net.avail_features() & offloads, offloads);
        drop(net);

        let mut tap = Tap::open(NAME).unwrap();
        let err = Tap::open(NAME).unwrap_err();
        assert!(matches!(err, TapError::Busy(_)), "{err}");
        let err = Tap::open("lo").unwrap_err();
        assert!(matches!(err, TapError::NotTap(_)), "{err}");
        link_up(NAME);
        let wire = Wire::bind(NAME);
        let mem = mem();

        // Guest to host: a scattered chain becomes one frame on the interface.
        let sent = frame([0xff; 6], GUEST_MAC, 300);
        mem.write_slice(&[0; HDR_LEN], GuestAddress(BUF)).unwrap();
        mem.write_slice(&sent, GuestAddress(BUF + 0x100)).unwrap();
        let mut tx_driver = Driver::new(&mem, 0x1000);
        tx_driver.post(&[
            (BUF, HDR_LEN as u32, R),
            (BUF + 0x100, sent.len() as u32, R),
        ]);
        let mut tx = Transmitter::new();
        tx.process_queue(&mem, &mut tx_driver.queue(), &mut tap)
            .unwrap();
        assert_eq!((tx.frames(), tx.dropped()), (1, 0));
        assert_eq!(wire.recv_from(GUEST_MAC), sent);

        // Host to guest: the frame waits in the TAP until the driver posts buffers.
        let sent = frame(GUEST_MAC, HOST_MAC, 500);
        wire.send(&sent);
        let mut rx_driver = Driver::new(&mem, 0);
        let mut rx = Receiver::new();
        rx.set_features(true, true);
        let pumped = rx.pump(&mem, &mut rx_driver.queue(), &mut tap).unwrap();
        assert_eq!(pumped.next, RxNext::WaitForBuffers);
        for i in 0..8 {
            rx_driver.post(&[(BUF + i * 0x1000, 2048, W)]);
        }
        let got = receive_from(HOST_MAC, &mem, &rx_driver, &mut rx, &mut tap);
        assert_eq!(got, sent);
        assert_eq!(rx.dropped(), 0);

        // Without privileges. The raw syscall, unlike libc's wrapper, changes this thread
        // only; its effective capabilities go with the effective UID.
        drop(tap);
        // SAFETY: setresuid only takes integers; -1 leaves an ID unchanged.
        let ret = unsafe { libc::syscall(libc::SYS_setresuid, -1, 65534, -1) };
        assert_eq!(ret, 0, "{}", io::Error::last_os_error());
        let err = Tap::open(NAME).unwrap_err();
        assert!(matches!(err, TapError::Permission(_)), "{err}");
    });
}
