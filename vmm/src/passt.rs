//! `--net user`: user-mode networking through passt, which rvmm starts for the VM. passt gets
//! its end of a Unix socket pair (`--fd`), so there is no socket file for anyone else to reach
//! and nothing to wait for before connecting; it speaks the length-prefixed frames of QEMU's
//! `-netdev stream` there (the device's side is `rvmm_devices::virtio::net::Stream`). The
//! guest's addressing is fixed, as QEMU's slirp has it (`config::user_net`): 10.0.2.15/24,
//! gateway 10.0.2.2, where passt answers and maps connections to the host's loopback.
//! `--publish` becomes passt's `-t`/`-u` port forwards, each host port checked free first.
//!
//! rvmm knows passt is ready when it answers an ARP request for the gateway; until then its
//! log is kept in a private directory, so that a passt that fails to start can be quoted. It
//! leaves by itself once rvmm's end of the socket is closed (one client only), and it is killed
//! with rvmm where the system allows (`PR_SET_PDEATHSIG`; passt started as root drops to
//! `nobody`, which clears that, but then the closed socket still ends it); it is reaped when
//! the VM ends.

use std::io;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rvmm_devices::virtio::net::{format_mac, Stream, TapIo, HDR_LEN, MAX_PACKET_LEN};
use vmm_sys_util::tempdir::TempDir;

use crate::config::{user_net, NetBackend, Protocol, PublishConfig, VmConfig};

/// Names the passt binary to use instead of the `passt` found on `PATH`.
const PASST_ENV: &str = "RVMM_PASST";
/// How long passt may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to leave once rvmm has closed its socket.
const EXIT_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(1);
/// How long a passt whose socket hung up may take to leave its exit status.
const ENDED_WAIT: Duration = Duration::from_secs(1);
/// passt's own MAC address on the guest's network: QEMU slirp's gateway's.
const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
/// What rvmm calls passt in messages.
const PEER: &str = "passt";

#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("--net user needs passt (apt-get install passt)")]
    NotInstalled,
    #[error("{PASST_ENV}={0}: no such file")]
    NoOverride(String),
    #[error("--publish: host port {addr}/{protocol} is not free")]
    PortBusy {
        addr: std::net::SocketAddr,
        protocol: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare passt's run directory (its log)")]
    RunDir(#[source] io::Error),
    #[error("cannot make the socket pair for passt")]
    Socket(#[source] io::Error),
    #[error("cannot start {path}")]
    Spawn {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("passt exited before it was ready ({status}): {said}")]
    Exited {
        status: ExitStatus,
        /// Its last line in its log.
        said: String,
    },
    #[error("passt did not answer within {START_TIMEOUT:?}")]
    Timeout,
    #[error("cannot talk to passt")]
    Probe(#[source] io::Error),
}

/// A running passt; its run directory lives until [`Passt::wait_ready`].
pub struct Passt {
    child: Child,
    run_dir: Option<TempDir>,
    log: PathBuf,
    guest_mac: [u8; 6],
}

impl Passt {
    /// Checks the published ports and starts passt for a guest with `guest_mac`; returns it
    /// with rvmm's end of the socket, without waiting for it (see [`Passt::wait_ready`]).
    fn start(guest_mac: [u8; 6], publish: &[PublishConfig]) -> Result<(Self, Stream), PasstError> {
        let path = binary()?;
        check_ports(publish)?;
        let run_dir = TempDir::new_with_prefix(std::env::temp_dir().join("rvmm-passt-"))
            .map_err(|e| PasstError::RunDir(io::Error::from_raw_os_error(e.errno())))?;
        let log = run_dir.as_path().join("passt.log");
        let (ours, theirs) = UnixStream::pair().map_err(PasstError::Socket)?;
        let stream = Stream::new(ours, PEER).map_err(PasstError::Socket)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&path);
        cmd.args(["--foreground", "--quiet", "--fd", &fd.to_string()])
            .arg("--log-file")
            .arg(&log)
            .args(arguments(publish, has_default_route()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Its log has what matters; stderr has the same plus syslog complaints.
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and makes only raw system
        // calls (prctl, fcntl) on an fd that stays open across the fork.
        unsafe {
            cmd.pre_exec(move || in_child(fd));
        }
        let child = cmd
            .spawn()
            .map_err(|source| PasstError::Spawn { path, source })?;
        log::debug!("passt (pid {}) started", child.id());
        let passt = Passt {
            child,
            run_dir: Some(run_dir),
            log,
            guest_mac,
        };
        Ok((passt, stream))
    }

    /// Waits until passt answers, on `stream`, an ARP request for the gateway.
    fn wait_ready(&mut self, stream: &mut Stream) -> Result<(), PasstError> {
        // The socket is empty: it takes the one small frame.
        stream
            .write_frame(&arp_request(self.guest_mac))
            .map_err(PasstError::Probe)?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut buf = vec![0; MAX_PACKET_LEN];
        loop {
            match stream.read_frame(&mut buf) {
                Ok(n) if is_arp_reply(&buf[HDR_LEN..n]) => break,
                // Anything else before it (nothing is expected) is not for a guest yet.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(status) = self.child.try_wait().map_err(PasstError::Probe)? {
                        return Err(self.exited(status));
                    }
                    if Instant::now() > deadline {
                        return Err(PasstError::Timeout);
                    }
                    std::thread::sleep(POLL);
                }
                // It hung up: it is leaving, or gone.
                Err(e) => match self.wait_exit(Instant::now() + EXIT_TIMEOUT) {
                    Some(status) => return Err(self.exited(status)),
                    None => return Err(PasstError::Probe(e)),
                },
            }
        }
        // Its directory goes now rather than at the end, when seccomp would forbid removing
        // it; passt keeps writing to its open log.
        self.run_dir = None;
        log::debug!("passt answers as {}", format_mac(&GATEWAY_MAC));
        Ok(())
    }

    /// How it ended, if it has: "passt ended: signal: 9 (SIGKILL)". Asked once its socket hung
    /// up, which a dying passt does before its exit status exists: that may take a moment.
    pub fn ended(&mut self) -> Option<String> {
        let status = self.wait_exit(Instant::now() + ENDED_WAIT)?;
        Some(format!("passt ended: {status}"))
    }

    fn exited(&self, status: ExitStatus) -> PasstError {
        PasstError::Exited {
            status,
            said: last_said(&self.log),
        }
    }

    /// Its status once it has exited, or None at `deadline`.
    fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Passt {
    /// passt leaves by itself once rvmm's end of the socket is closed; one that does not is
    /// killed. Either way it is reaped.
    fn drop(&mut self) {
        // Never connected (the VM failed to build): rvmm still holds the socket.
        let connected = self.run_dir.is_none();
        let deadline = Instant::now()
            + if connected {
                EXIT_TIMEOUT
            } else {
                Duration::ZERO
            };
        if self.wait_exit(deadline).is_some() {
            return;
        }
        if connected {
            log::warn!("passt (pid {}) did not exit; killing it", self.child.id());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the passt of `--net user`, if the VM has one, with rvmm's end of its socket.
pub fn start_for(cfg: &VmConfig) -> Result<Option<(Passt, Stream)>, PasstError> {
    let Some(net) = cfg.nets.iter().find(|n| n.backend == NetBackend::User) else {
        return Ok(None);
    };
    Passt::start(net.guest_mac(), &cfg.publish).map(Some)
}

/// Waits until the passt [`start_for`] started (if any) is ready; returns it and the stream
/// for the virtio-net device.
pub fn ready(
    started: Option<(Passt, Stream)>,
) -> Result<(Option<Passt>, Option<Stream>), PasstError> {
    let Some((mut passt, mut stream)) = started else {
        return Ok((None, None));
    };
    passt.wait_ready(&mut stream)?;
    Ok((Some(passt), Some(stream)))
}

/// What [`start_for`] refuses before anything starts, for a caller that wants to know before
/// it starts the VM at all (`rvmm run`): no passt, or a published host port that is not free.
pub fn preflight(publish: &[PublishConfig]) -> Result<(), PasstError> {
    binary()?;
    check_ports(publish)
}

/// `$RVMM_PASST`, or `passt` on `PATH`.
fn binary() -> Result<String, PasstError> {
    if let Some(path) = std::env::var_os(PASST_ENV) {
        let path = path.to_string_lossy().into_owned();
        return match Path::new(&path).is_file() {
            true => Ok(path),
            false => Err(PasstError::NoOverride(path)),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("passt"))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .ok_or(PasstError::NotInstalled)
}

/// Binds each published host port for a moment: passt would only warn about one it cannot
/// bind, and the guest's service would then be unreachable without a word.
fn check_ports(publish: &[PublishConfig]) -> Result<(), PasstError> {
    for p in publish {
        let addr = p.host_addr();
        let bound = match p.protocol {
            Protocol::Tcp => TcpListener::bind(addr).map(drop),
            Protocol::Udp => UdpSocket::bind(addr).map(drop),
        };
        bound.map_err(|source| PasstError::PortBusy {
            addr,
            protocol: p.protocol.name(),
            source,
        })?;
    }
    Ok(())
}

/// passt's options past the socket and log: the fixed addressing, the port forwards, and the
/// loopback as the template interface on a host without a default route, where passt would
/// otherwise find no interface to take its settings from and refuse to start (the guest then
/// reaches the host only, which is all there is).
fn arguments(publish: &[PublishConfig], default_route: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--address".to_string(),
        user_net::GUEST.to_string(),
        "--netmask".to_string(),
        user_net::PREFIX_LEN.to_string(),
        "--gateway".to_string(),
        user_net::GATEWAY.to_string(),
        "--mac-addr".to_string(),
        format_mac(&GATEWAY_MAC),
    ]
    .into();
    if !default_route {
        args.extend(["--interface".to_string(), "lo".to_string()]);
    }
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let flag = match protocol {
            Protocol::Tcp => "--tcp-ports",
            Protocol::Udp => "--udp-ports",
        };
        let forwards: Vec<String> = publish
            .iter()
            .filter(|p| p.protocol == protocol)
            .map(|p| match p.host_ip {
                Some(ip) => format!("{ip}/{}:{}", p.host_port, p.guest_port),
                None => format!("{}:{}", p.host_port, p.guest_port),
            })
            .collect();
        // Explicitly none: passt would otherwise forward UDP on the TCP ports too.
        if forwards.is_empty() {
            args.extend([flag.to_string(), "none".to_string()]);
        }
        for forward in forwards {
            args.extend([flag.to_string(), forward]);
        }
    }
    args
}

/// Whether the host has a default route (IPv4, or IPv6 through an interface other than the
/// loopback), as passt looks for one to take its settings from.
fn has_default_route() -> bool {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    default_route_in(&v4, &v6)
}

fn default_route_in(route: &str, ipv6_route: &str) -> bool {
    // Iface Destination Gateway Flags RefCnt Use Metric Mask …
    let v4 = route.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 7 && f[1] == "00000000" && f[7] == "00000000"
    });
    // dest dest_len src src_len next_hop metric refcnt use flags iface
    let v6 = ipv6_route.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let default = f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00";
        default && f[9] != "lo"
    });
    v4 || v6
}

/// An ARP request from the guest for the gateway, behind a virtio-net header.
fn arp_request(guest_mac: [u8; 6]) -> Vec<u8> {
    let mut p = vec![0u8; HDR_LEN];
    p.extend([0xff; 6]);
    p.extend(guest_mac);
    p.extend([0x08, 0x06]);
    // Ethernet, IPv4, their address lengths, request.
    p.extend([0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    p.extend(guest_mac);
    p.extend(user_net::GUEST.octets());
    p.extend([0; 6]);
    p.extend(user_net::GATEWAY.octets());
    // The shortest Ethernet frame.
    p.resize(HDR_LEN + 60, 0);
    p
}

/// An ARP reply from the gateway.
fn is_arp_reply(frame: &[u8]) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 2]
        && frame[28..32] == user_net::GATEWAY.octets()
}

/// passt's last line in its log, without its time and level: "External interface not usable".
fn last_said(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().rfind(|l| !l.trim().is_empty()) else {
        return "no message".to_string();
    };
    // "0.3473: ERROR:   External interface not usable"
    let line = match line.split_once(": ") {
        Some((time, rest)) if time.parse::<f64>().is_ok() => rest,
        _ => line,
    };
    let line = match line.split_once(':') {
        Some((level, rest)) if level.bytes().all(|b| b.is_ascii_alphabetic()) => rest,
        _ => line,
    };
    line.trim().to_string()
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// In the forked child: die with rvmm, and keep passt's end of the socket pair across exec.
fn in_child(fd: RawFd) -> io::Result<()> {
    // SAFETY: prctl and fcntl with integer arguments only.
    unsafe {
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
        check(libc::fcntl(fd, libc::F_SETFD, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(specs: &[&str]) -> Vec<PublishConfig> {
        specs.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn arguments_fix_the_addressing_and_forward_the_ports() {
        let args = arguments(
            &publish(&["127.0.0.1:18082:80", "8080:8080", "[::1]:53:53/udp"]),
            true,
        );
        let want = "--address 10.0.2.15 --netmask 24 --gateway 10.0.2.2 --mac-addr \
                    52:55:0a:00:02:02 --tcp-ports 127.0.0.1/18082:80 --tcp-ports 8080:8080 \
                    --udp-ports ::1/53:53";
        assert_eq!(args.join(" "), want);
        let args = arguments(&[], false).join(" ");
        assert!(
            args.ends_with(" --interface lo --tcp-ports none --udp-ports none"),
            "{args}"
        );
    }

    #[test]
    fn default_routes_are_found_as_passt_looks_for_them() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        let local = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let zero = "00000000000000000000000000000000";
        let v6_lo = format!("{zero} 00 {zero} 00 {zero} ffffffff 00000001 00000000 00200200 lo\n");
        let v6_eth =
            format!("{zero} 00 {zero} 00 fd000000000000000000000000000001 00000400 2 0 3 eth0\n");
        assert!(default_route_in(route, &v6_lo));
        assert!(!default_route_in(local, &v6_lo));
        assert!(default_route_in(local, &v6_eth));
        assert!(!default_route_in("", ""));
    }

    #[test]
    fn the_probe_is_an_arp_request_for_the_gateway() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let req = arp_request(mac);
        assert_eq!(req.len(), HDR_LEN + 60);
        let frame = &req[HDR_LEN..];
        assert!(!is_arp_reply(frame), "a request");
        let mut reply = frame.to_vec();
        reply[21] = 2;
        reply[28..32].copy_from_slice(&user_net::GATEWAY.octets());
        assert!(is_arp_reply(&reply));
        assert!(!is_arp_reply(&reply[..41]));
    }

    #[test]
    fn passt_says_its_last_line_plainly() {
        let dir = TempDir::new_with_prefix("/tmp/rvmm-passt-test-").unwrap();
        let log = dir.as_path().join("log");
        std::fs::write(
            &log,
            "passt unknown version: /usr/bin/passt.avx2 (1088)\n\
             0.3473: WARNING: No external routable interface for IPv4\n\
             0.3473: ERROR:   External interface not usable\n",
        )
        .unwrap();
        assert_eq!(last_said(&log), "External interface not usable");
        assert_eq!(last_said(&dir.as_path().join("none")), "no message");
    }

    #[test]
    fn a_busy_port_is_refused_before_passt_starts() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = check_ports(&publish(&[&format!("127.0.0.1:{port}:80")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--publish: host port 127.0.0.1:{port}/tcp is not free")
        );
        // The same port over UDP is another port.
        check_ports(&publish(&[&format!("127.0.0.1:{port}:80/udp")])).unwrap();
    }
}
