//! The host ↔ agent protocol over one vsock stream.
//!
//! A frame is `[version: u8][length: u32 LE][payload]`; the payload is one [`Message`] in
//! bincode. Bincode rather than JSON because stdio data is most of the traffic: it encodes a
//! `Vec<u8>` as a length and the raw bytes, where JSON would write every byte as a decimal
//! number. Its only dependency is serde, which both sides already use.
//!
//! The agent connects to the host, sends [`Message::Hello`], then serves requests one after
//! another: the host sends [`Message::Run`], may send stdin data, stdin close and signals, and
//! the agent answers with stdout/stderr data and finally [`Message::Exit`] (or
//! [`Message::Failed`] when the command could not be started). [`Message::Shutdown`] powers
//! the guest off. In a shared VM (`rvmm vm start`) each `rvmm` command opens a session of its
//! own on [`EXEC_PORT`]: a run, a detached run (answered [`Message::Started`]), an exec into a
//! named container, a [`Message::List`] or a [`Message::Kill`].

use std::io::{self, Read, Write};

use bincode::Options;
use serde::{Deserialize, Serialize};

/// Bumped whenever a message changes shape; a peer with another version is refused.
pub const VERSION: u8 = 3;
/// The vsock port the host listens on and the agent connects to.
pub const AGENT_PORT: u32 = 1024;
/// The vsock port the agent listens on for more sessions from the host (`rvmm-oci exec`).
pub const EXEC_PORT: u32 = 1025;
/// The largest payload either side accepts; stdio data is sent in chunks below it.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Stdio is relayed in chunks of at most this many bytes.
pub const CHUNK: usize = 64 * 1024;
const HEADER_LEN: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame truncated: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error("frame of {0} bytes is larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u8),
    #[error("malformed message")]
    Malformed(#[source] bincode::Error),
    #[error("connection closed")]
    Closed,
    #[error("connection failed")]
    Io(#[source] io::Error),
}

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// Who the command runs as, as the image config names it ("", "user", "uid", "user:group",
/// "uid:gid"); the agent resolves names against the image's /etc/passwd and /etc/group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    pub argv: Vec<String>,
    /// KEY=VALUE entries, in order; later entries override earlier ones.
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    /// Whether the host sends stdin; without it the command's stdin is /dev/null.
    pub stdin: bool,
    /// Whether the container shares the VM's network instead of getting its own namespace.
    pub host_network: bool,
    /// Host directories the container sees, each shared with the VM over virtio-fs.
    pub volumes: Vec<Volume>,
    /// A complete OCI runtime config (config.json) to run as it is, after mounting `volumes`,
    /// instead of one made from the fields above: what rvmm-oci sends for a bundle whose root
    /// and mounts it has rewritten to the guest's volume paths.
    pub spec: Option<String>,
    /// Run the container on a terminal of this size (the spec's process.terminal must agree);
    /// stdout and stderr then arrive together as stdout.
    pub terminal: Option<WindowSize>,
    /// Configure the guest's eth0 so and run the container in the guest's network namespace
    /// (rvmm-oci, whose VM joins the caller's network).
    pub network: Option<GuestNetwork>,
    /// The container's name, unique among the VM's running containers; None: the agent
    /// names it.
    pub name: Option<String>,
    /// The image's ext4 disk as a file name on the VM's image share ([`IMAGE_TAG`]), which the
    /// agent loop-mounts read-only; None: the VM's own image disk.
    pub image: Option<String>,
    /// Start the container and answer [`Message::Started`] at once; its output is discarded
    /// and its end kept for [`Message::List`].
    pub detach: bool,
}

/// The virtio-fs tag of a shared VM's image store: the host's cache of image disks.
pub const IMAGE_TAG: &str = "rvmm-images";

/// What the guest's eth0 becomes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The MAC the VM's interface already has; kept to name the interface in messages.
    pub mac: String,
    /// CIDR addresses, such as 10.88.0.5/16.
    pub addresses: Vec<String>,
    pub gateway: Option<String>,
    pub mtu: u32,
    /// The container's `net.*` sysctls (name, value), set in the guest's namespace, which is
    /// the container's: crun takes them only for a namespace of the container's own.
    pub sysctls: Vec<(String, String)>,
}

/// A process to start in the running container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The OCI process (process.json) as crun exec takes it.
    pub process: String,
    /// On a terminal of this size (the process's `terminal` must agree).
    pub terminal: Option<WindowSize>,
    /// The container to join, by name; None: the connection's VM's only container (rvmm-oci).
    pub container: Option<String>,
    /// With `process` empty: run these arguments with the container's own environment, user
    /// and working directory.
    pub argv: Vec<String>,
}

/// A container of the VM, as [`Message::Containers`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub name: String,
    /// The image disk's file name, or "" for the VM's own image.
    pub image: String,
    pub command: Vec<String>,
    /// None while it runs.
    pub exit: Option<ExitStatus>,
}

/// A terminal's size in characters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// A host directory that the VM has as virtio-fs `tag` and the container sees at
/// `destination`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub tag: String,
    pub destination: String,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// agent → host, once after connecting.
    Hello {
        agent: String,
    },
    /// host → agent: start a command; only one runs at a time. Boxed: it is far larger than
    /// the stdio messages that make up most of the traffic.
    Run(Box<RunRequest>),
    Stdin(Vec<u8>),
    StdinClose,
    /// host → agent: deliver this signal to the container.
    Signal(i32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
    /// agent → host: the command could not be started; one line.
    Failed(String),
    /// host → agent: power the VM off.
    Shutdown,
    // Later additions stay at the end, so that the earlier messages keep their encoding.
    /// host → agent: start another process in the running container (`crun exec`); it is
    /// this connection's command, answered like a run.
    Exec(Box<ExecRequest>),
    /// host → agent: the container's terminal has a new size.
    Resize(WindowSize),
    /// agent → host: the detached container with this name started.
    Started(String),
    /// host → agent: which containers the VM has; answered [`Message::Containers`].
    List,
    Containers(Vec<ContainerInfo>),
    /// host → agent: deliver `signal` to the named container; answered [`Message::Done`] or
    /// [`Message::Failed`].
    Kill {
        name: String,
        signal: i32,
    },
    Done,
    /// host → agent: the VM is about to be snapshotted, with this connection open, to be
    /// restored later, maybe many times over. The connection's end no longer powers the guest
    /// off: in each restored VM it ends (the transport reset), the agent connects to
    /// [`AGENT_PORT`] again, and the host sends [`Message::Resume`] first; a
    /// [`Message::Shutdown`] powers the guest off. First the agent runs one throwaway
    /// container, so that what a container start needs is in the snapshot's memory. Answered
    /// [`Message::Done`], or [`Message::Failed`] when that container failed (parked all the
    /// same).
    Park,
    /// host → agent, first on the connection of a VM restored from a parked snapshot;
    /// answered [`Message::Done`] or [`Message::Failed`].
    Resume(Resume),
}

/// What a guest restored from a snapshot needs from its host before it runs anything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The host's wall clock, in nanoseconds since the epoch: the guest's stopped when the
    /// snapshot was taken.
    pub realtime_ns: u64,
    /// Random bytes for the guest's random pool, whose state every restored copy shares.
    pub entropy: Vec<u8>,
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(MAX_PAYLOAD as u64)
        .reject_trailing_bytes()
}

/// One frame holding `msg`.
pub fn encode(msg: &Message) -> Result<Vec<u8>, ProtocolError> {
    let payload = codec().serialize(msg).map_err(ProtocolError::Malformed)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(payload.len()));
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.push(VERSION);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// The payload length a frame header announces, after checking its version and size.
fn parse_header(header: &[u8; HEADER_LEN]) -> Result<usize, ProtocolError> {
    if header[0] != VERSION {
        return Err(ProtocolError::Version(header[0]));
    }
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes the frame at the start of `bytes`: the message and how many bytes it used.
pub fn decode(bytes: &[u8]) -> Result<(Message, usize), ProtocolError> {
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(ProtocolError::Truncated {
            have: bytes.len(),
            need: HEADER_LEN,
        })?;
    let len = parse_header(header)?;
    let payload = bytes
        .get(HEADER_LEN..HEADER_LEN + len)
        .ok_or(ProtocolError::Truncated {
            have: bytes.len(),
            need: HEADER_LEN + len,
        })?;
    let msg = codec()
        .deserialize(payload)
        .map_err(ProtocolError::Malformed)?;
    Ok((msg, HEADER_LEN + len))
}

/// Writes one frame.
pub fn send(out: &mut impl Write, msg: &Message) -> Result<(), ProtocolError> {
    let frame = encode(msg)?;
    out.write_all(&frame).map_err(ProtocolError::Io)?;
    out.flush().map_err(ProtocolError::Io)
}

/// Reads one frame: [`ProtocolError::Closed`] at a clean end of stream, `Truncated` when the
/// stream ends inside a frame.
pub fn recv(input: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    let have = read_full(input, &mut header)?;
    if have == 0 {
        return Err(ProtocolError::Closed);
    }
    if have < HEADER_LEN {
        return Err(ProtocolError::Truncated {
            have,
            need: HEADER_LEN,
        });
    }
    let len = parse_header(&header)?;
    let mut frame = header.to_vec();
    frame.resize(HEADER_LEN + len, 0);
    let have = read_full(input, &mut frame[HEADER_LEN..])?;
    if have < len {
        return Err(ProtocolError::Truncated {
            have: HEADER_LEN + have,
            need: HEADER_LEN + len,
        });
    }
    decode(&frame).map(|(msg, _)| msg)
}

/// Fills `buf` unless the stream ends first; returns how much was read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut have = 0;
    while have < buf.len() {
        match input.read(&mut buf[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    Ok(have)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_message() -> Vec<Message> {
        vec![
            Message::Hello {
                agent: "rvmm-agent 0.1".into(),
            },
            Message::Run(Box::new(RunRequest {
                argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
                env: vec!["FOO=bar".into()],
                cwd: "/".into(),
                user: "1000:1000".into(),
                stdin: true,
                host_network: false,
                volumes: vec![Volume {
                    tag: "v0".into(),
                    destination: "/data".into(),
                    read_only: true,
                }],
                spec: Some("{}".into()),
                terminal: Some(WindowSize { rows: 24, cols: 80 }),
                network: Some(GuestNetwork {
                    mac: "02:00:00:00:00:01".into(),
                    addresses: vec!["10.0.0.2/24".into()],
                    gateway: Some("10.0.0.1".into()),
                    mtu: 1500,
                    sysctls: vec![("net.ipv4.ping_group_range".into(), "0 0".into())],
                }),
                name: Some("web".into()),
                image: Some("sha256-00.ext4".into()),
                detach: true,
            })),
            Message::Exec(Box::new(ExecRequest {
                process: String::new(),
                terminal: None,
                container: Some("web".into()),
                argv: vec!["cat".into()],
            })),
            Message::Started("web".into()),
            Message::List,
            Message::Containers(vec![ContainerInfo {
                name: "web".into(),
                image: "sha256-00.ext4".into(),
                command: vec!["httpd".into()],
                exit: Some(ExitStatus::Code(0)),
            }]),
            Message::Kill {
                name: "web".into(),
                signal: 15,
            },
            Message::Done,
            Message::Park,
            Message::Resume(Resume {
                realtime_ns: 1_796_000_000_000_000_000,
                entropy: vec![7; 32],
            }),
            Message::Resize(WindowSize {
                rows: 50,
                cols: 132,
            }),
            Message::Stdin(b"data".to_vec()),
            Message::StdinClose,
            Message::Signal(15),
            Message::Stdout(vec![0; CHUNK]),
            Message::Stderr(Vec::new()),
            Message::Exit(ExitStatus::Code(3)),
            Message::Exit(ExitStatus::Signal(9)),
            Message::Failed("no such file".into()),
            Message::Shutdown,
        ]
    }

    #[test]
    fn round_trips_every_message_through_a_stream() {
        let mut stream = Vec::new();
        for msg in every_message() {
            send(&mut stream, &msg).unwrap();
        }
        let mut input = stream.as_slice();
        for msg in every_message() {
            assert_eq!(recv(&mut input).unwrap(), msg);
        }
        assert!(matches!(recv(&mut input), Err(ProtocolError::Closed)));
    }

    #[test]
    fn stdio_data_is_not_inflated() {
        let frame = encode(&Message::Stdout(vec![0xff; 1000])).unwrap();
        assert!(frame.len() < 1010, "{}", frame.len());
    }

    #[test]
    fn rejects_truncated_frames() {
        let frame = encode(&Message::Stdout(b"hello".to_vec())).unwrap();
        for cut in 0..frame.len() {
            assert!(
                matches!(decode(&frame[..cut]), Err(ProtocolError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            recv(&mut &frame[..frame.len() - 1]),
            Err(ProtocolError::Truncated { .. })
        ));
        assert!(matches!(
            recv(&mut &frame[..3]),
            Err(ProtocolError::Truncated { .. })
        ));
    }

    #[test]
    fn rejects_oversized_lengths_before_reading_them() {
        let mut frame = vec![VERSION];
        frame.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&frame), Err(ProtocolError::TooLarge(_))));
        assert!(matches!(
            recv(&mut frame.as_slice()),
            Err(ProtocolError::TooLarge(_))
        ));
        let big = Message::Stdout(vec![0; MAX_PAYLOAD]);
        assert!(encode(&big).is_err());
    }

    #[test]
    fn rejects_unknown_versions() {
        let mut frame = encode(&Message::Shutdown).unwrap();
        frame[0] = VERSION + 1;
        let next = VERSION + 1;
        assert!(matches!(decode(&frame), Err(ProtocolError::Version(v)) if v == next));
        assert!(matches!(
            recv(&mut frame.as_slice()),
            Err(ProtocolError::Version(v)) if v == next
        ));
    }

    #[test]
    fn rejects_malformed_payloads() {
        // An unknown enum tag, a length inside the payload larger than the payload, and a
        // valid message followed by junk in the same frame.
        for payload in [
            vec![200u8],
            vec![5, 250, 0xff, 0xff, 0xff, 0x7f],
            vec![10, 0],
        ] {
            let mut frame = vec![VERSION];
            frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            frame.extend_from_slice(&payload);
            assert!(
                matches!(decode(&frame), Err(ProtocolError::Malformed(_))),
                "{payload:?}"
            );
        }
    }

    #[test]
    fn decode_reports_the_bytes_used() {
        let mut bytes = encode(&Message::StdinClose).unwrap();
        let first = bytes.len();
        bytes.extend(encode(&Message::Signal(2)).unwrap());
        let (msg, used) = decode(&bytes).unwrap();
        assert_eq!((msg, used), (Message::StdinClose, first));
        assert_eq!(decode(&bytes[used..]).unwrap().0, Message::Signal(2));
    }
}
