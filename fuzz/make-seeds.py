#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/<target>/: small valid inputs (plus a few hostile
ones) in each target's input format, so the fuzzer starts from requests a real driver makes.
Run it again after changing a format; the files are committed."""

import os
import io
import json
import struct
import tarfile
import sys

SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")

# FuzzGuest layout (fuzz/src/lib.rs): queue i at i * 0x400, avail +0x100, used +0x200.
QSTRIDE, AVAIL, USED = 0x400, 0x100, 0x200
NEXT, WRITE = 1, 2
QSIZE_16 = 4  # control bits 0-2: log2 of the queue size
EVENT_IDX = 0x80


class Guest:
    """Guest memory image plus control byte, in FuzzGuest's input format."""

    def __init__(self, control=QSIZE_16):
        self.control = control
        self.mem = bytearray()
        self.posted = {}

    def put(self, addr, data):
        end = addr + len(data)
        if len(self.mem) < end:
            self.mem.extend(bytes(end - len(self.mem)))
        self.mem[addr:end] = data

    def chain(self, queue, descs):
        """Posts a chain of (addr, len, flags) into consecutive descriptor slots."""
        base = queue * QSTRIDE
        first = sum(self.posted.get(queue, []))
        for i, (addr, length, flags) in enumerate(descs):
            slot = first + i
            more = i + 1 < len(descs)
            nxt = slot + 1 if more else 0
            self.put(base + 16 * slot, struct.pack("<QIHH", addr, length, flags | (NEXT if more else 0), nxt))
        n = len(self.posted.setdefault(queue, []))
        self.posted[queue].append(len(descs))
        self.put(base + AVAIL + 4 + 2 * n, struct.pack("<H", first))
        self.put(base + AVAIL, struct.pack("<HH", 0, n + 1))

    def raw_desc(self, queue, slot, addr, length, flags, nxt):
        self.put(queue * QSTRIDE + 16 * slot, struct.pack("<QIHH", addr, length, flags, nxt))

    def avail(self, queue, heads):
        base = queue * QSTRIDE + AVAIL
        self.put(base, struct.pack("<HH", 0, len(heads)))
        for i, h in enumerate(heads):
            self.put(base + 4 + 2 * i, struct.pack("<H", h))

    def bytes(self):
        return bytes([self.control]) + bytes(self.mem)


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


HDR, DATA, STATUS = 0xC00, 0xE00, 0x1000


def blk(req_type, sector, data_descs, extra=b""):
    g = Guest()
    g.put(HDR, struct.pack("<IIQ", req_type, 0, sector))
    if extra:
        g.put(DATA, extra)
    g.chain(0, [(HDR, 16, 0)] + data_descs + [(STATUS, 1, WRITE)])
    return g


def blk_seeds():
    t = "virtio_blk"
    write(t, "read", blk(0, 1, [(DATA, 512, WRITE)]).bytes())
    write(t, "write", blk(1, 2, [(DATA, 512, 0)], bytes(range(256)) * 2).bytes())
    write(t, "flush", blk(4, 0, []).bytes())
    write(t, "get-id", blk(8, 0, [(DATA, 20, WRITE)]).bytes())
    rng = struct.pack("<QII", 3, 4, 0)
    write(t, "discard", blk(11, 0, [(DATA, 16, 0)], rng).bytes())
    write(t, "write-zeroes", blk(13, 0, [(DATA, 16, 0)], struct.pack("<QII", 1, 2, 1)).bytes())
    g = blk(0, 15, [(DATA, 512, WRITE), (DATA + 0x200, 512, WRITE)])
    write(t, "read-past-end", g.bytes())
    g = Guest(QSIZE_16 | EVENT_IDX)
    g.put(HDR, struct.pack("<IIQ", 0, 0, 0))
    g.chain(0, [(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)])
    g.chain(0, [(HDR, 16, 0), (0xFFFF_FFFF_0000, 512, WRITE), (STATUS, 1, WRITE)])
    write(t, "event-idx-two-chains", g.bytes())
    g = Guest()
    g.raw_desc(0, 0, HDR, 16, NEXT, 1)
    g.raw_desc(0, 1, DATA, 512, NEXT | WRITE, 0)
    g.avail(0, [0])
    write(t, "loop", g.bytes())


def net_seeds():
    t = "virtio_net_tx"
    frame = bytes(12) + b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x06" + bytes(46)
    g = Guest()
    g.put(HDR, frame)
    g.chain(0, [(HDR, len(frame), 0)])
    write(t, "one-frame", g.bytes())
    g = Guest()
    g.put(HDR, frame)
    g.chain(0, [(HDR, 12, 0), (HDR + 12, len(frame) - 12, 0)])
    g.chain(0, [(HDR, 12, 0)])
    write(t, "split-and-short", g.bytes())
    g = Guest(QSIZE_16 | EVENT_IDX | 0x08)
    g.put(HDR, frame)
    g.chain(0, [(HDR, len(frame), WRITE)])
    g.chain(0, [(HDR, len(frame), 0)])
    write(t, "wrong-way-and-refused", g.bytes())


def net_rx_seeds():
    t = "virtio_net_rx"
    g = Guest()
    for i in range(4):
        g.chain(0, [(0x1000 + i * 0x800, 0x800, WRITE)])
    write(t, "four-buffers", g.bytes())
    g = Guest(QSIZE_16 | 0x08 | 0x10 | EVENT_IDX)
    for i in range(8):
        g.chain(0, [(0x1000 + i * 0x1000, 12, WRITE), (0x1000 + i * 0x1000 + 12, 0xFF4, WRITE)])
    write(t, "merged-split", g.bytes())
    # 0x20: the TAP reads straight into guest buffers; sixteen chains over one 8 KiB region
    # hold the largest frame, so frames take that path.
    g = Guest(QSIZE_16 | 0x08 | 0x20 | EVENT_IDX)
    for i in range(16):
        g.chain(0, [(0x4000, 0x2000, WRITE)])
    write(t, "merged-scatter", g.bytes())
    g = Guest()
    g.chain(0, [(0x1000, 8, WRITE)])
    g.chain(0, [(0x2000, 0x800, 0)])
    write(t, "short-and-readable", g.bytes())


def vsock_hdr(op, src_port, dst_port, data=b"", flags=0, src_cid=3, dst_cid=2):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, len(data), 1, op, flags, 65536, 0) + data


def vsock_guest(packets, control=QSIZE_16, rx=4):
    g = Guest(control)
    for i in range(rx):
        g.chain(0, [(0x4000 + i * 0x200, 0x200, WRITE)])
    addr = 0x1000
    for p in packets:
        g.put(addr, p)
        g.chain(1, [(addr, len(p), 0)])
        addr += (len(p) + 0xFF) & ~0xFF
    return g


def vsock_seeds():
    t = "virtio_vsock"
    req, resp, rst, shut, rw, cu, cr = 1, 2, 3, 4, 5, 6, 7
    write(t, "connect-send-close", vsock_guest([
        vsock_hdr(req, 5000, 1024),
        vsock_hdr(rw, 5000, 1024, b"hello host\n"),
        vsock_hdr(cr, 5000, 1024),
        vsock_hdr(cu, 5000, 1024),
        vsock_hdr(shut, 5000, 1024, flags=3),
        vsock_hdr(rst, 5000, 1024),
    ]).bytes())
    write(t, "refused", vsock_guest([vsock_hdr(req, 5001, 1025), vsock_hdr(rw, 5001, 1025, b"x")]).bytes())
    # Host connects to guest port 52 (control bit 3); the guest answers the first local port.
    write(t, "host-connect", vsock_guest([
        vsock_hdr(resp, 52, 1 << 30),
        vsock_hdr(rw, 52, 1 << 30, b"hi"),
    ], QSIZE_16 | 0x08 | EVENT_IDX).bytes())
    g = vsock_guest([vsock_hdr(req, 5002, 1024, src_cid=9, dst_cid=77)])
    write(t, "wrong-cids", g.bytes())


def mmio_op(write_, offset, value=0, width=4):
    log = {1: 0, 2: 1, 4: 2, 8: 3}[width]
    return struct.pack("<BHI", (log << 1) | (1 if write_ else 0), offset, value)


def mmio_seeds():
    t = "virtio_mmio"
    r = lambda off: mmio_op(False, off)
    w = lambda off, v: mmio_op(True, off, v)
    ops = [r(0x0), r(0x4), r(0x8), r(0xC), w(0x70, 1), w(0x70, 3)]
    ops += [w(0x14, 1), r(0x10), w(0x14, 0), r(0x10), w(0x24, 1), w(0x20, 1), w(0x24, 0), w(0x20, 0x0B)]
    ops += [w(0x70, 0xB), r(0x70)]
    for q, base in ((0, 0x1000), (1, 0x4000)):
        ops += [w(0x30, q), r(0x34), w(0x38, 16), w(0x80, base), w(0x84, 0), w(0x90, base + 0x100), w(0x94, 0)]
        ops += [w(0xA0, base + 0x200), w(0xA4, 0), w(0x44, 1), r(0x44)]
    ops += [w(0x70, 0xF), r(0x70), w(0x50, 0), w(0x50, 1), r(0x60), w(0x64, 1), r(0xFC)]
    ops += [mmio_op(False, 0x100, 0, 8), mmio_op(True, 0x102, 0x4142, 2), w(0x70, 0), r(0x70)]
    write(t, "init-run-reset", bytes([0]) + b"".join(ops))
    write(t, "activate-refused", bytes([0x18]) + b"".join(ops))
    bad = [w(0x70, 0xF), w(0x30, 7), w(0x38, 3), w(0x44, 1), mmio_op(True, 0x71, 1, 1), w(0x70, 0x80)]
    write(t, "out-of-order", bytes([0]) + b"".join(bad))


def elf_minimal():
    code = b"\xf4\xeb\xfd"  # hlt; jmp .-1
    entry = 0x200000
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x78, entry, entry, len(code), len(code), 0x1000)
    return ehdr + phdr + code


def bzimage_minimal():
    img = bytearray(0x600)
    img[0x1F1] = 1  # setup_sects: the protected-mode kernel starts at 0x400
    img[0x1FE:0x200] = b"\x55\xaa"
    img[0x202:0x206] = b"HdrS"
    img[0x206:0x208] = struct.pack("<H", 0x020F)
    img[0x211] = 1  # loadflags: LOADED_HIGH
    img[0x400:0x403] = b"\xf4\xeb\xfd"
    return bytes(img)


def boot_seeds():
    t = "boot_loader"
    elf = elf_minimal()
    # The config target loads this one as its kernel (after the control byte).
    write(t, "elf-minimal", bytes([0]) + elf)
    write(t, "elf-with-initrd", bytes([0x03]) + struct.pack("<H", 64) + elf + bytes(range(64)))
    write(t, "bzimage-minimal", bytes([0x0E]) + bzimage_minimal())
    write(t, "garbage", bytes([0]) + bytes(range(256)) * 4)


def config_seeds():
    t = "config_cmdline"
    a = lambda opt, v: bytes([opt]) + v.encode() + b"\0"
    write(t, "disks-net-vsock", a(0, "/etc/passwd,ro,serial=abc") + a(1, "tap=tap0,mac=52:54:00:12:34:56")
          + a(2, "cid=3,uds=/tmp/rvmm-fuzz.sock") + a(5, "64") + a(6, "2"))
    write(t, "cmdline-console", a(3, "console=hvc0 quiet") + a(7, "virtio") + a(8, "baseline"))
    write(t, "rootfs-and-dup", a(4, "/etc/passwd") + a(0, "/etc/passwd") + a(0, "/etc//passwd,serial="))
    write(t, "bad-specs", a(1, "tap=,mac=zz") + a(2, "cid=2") + a(0, ",ro") + a(6, "0") + a(5, "999999999"))


def frame(payload, version=1):
    """A host-agent protocol frame: version, little-endian length, bincode payload."""
    return bytes([version]) + struct.pack("<I", len(payload)) + payload


def bytes_field(data):
    """bincode (varint) encoding of a byte string or string shorter than 251 bytes."""
    return bytes([len(data)]) + data


def protocol_seeds():
    t = "agent_protocol"
    hello = frame(bytes([0]) + bytes_field(b"rvmm-agent 0.1"))
    write(t, "hello", hello)
    write(t, "stdin-close-shutdown", frame(bytes([2]) + bytes_field(b"hello\n")) + frame(bytes([3]))
          + frame(bytes([9])))
    # Exit(Code(3)): zigzag varint 6; Signal(9): zigzag 18.
    write(t, "stdout-exit", frame(bytes([5]) + bytes_field(b"out")) + frame(bytes([7, 0, 6]))
          + frame(bytes([4, 18])))
    write(t, "bad-version-and-length", frame(bytes([3]), version=2) + b"\x01\xff\xff\xff\x7f")


def tar_entry(tar, name, data=None, link=None, kind=None):
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = link
    elif kind is not None:
        info.type = kind
    else:
        info.size = len(data or b"")
    tar.addfile(info, io.BytesIO(data or b"") if info.size else None)


def layer_seeds():
    t = "container_layer"
    entries = {
        "files-and-dirs": [("bin/", None, None, tarfile.DIRTYPE), ("bin/sh", b"#!", None, None),
                           ("etc/hostname", b"rvmm\n", None, None)],
        "whiteouts": [("etc/.wh.passwd", b"", None, None), ("usr/.wh..wh..opq", b"", None, None),
                      ("usr/lib/keep", b"k", None, None)],
        "escapes": [("../outside/x", b"x", None, None), ("out/.wh.canary", b"", None, None),
                    ("rel/.wh..wh..opq", b"", None, None), ("out/new", b"n", None, None)],
        "links": [("l", None, "/etc", None), ("l/passwd", b"p", None, None),
                  ("h", None, "../../outside/canary", None)],
    }
    for name, items in entries.items():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path, data, link, kind in items:
                tar_entry(tar, path, data, link, kind)
        write(t, name, buf.getvalue())


# vhost-user (fuzz/src/bin/vhost_user_frontend.rs): the replies a backend sends, in the order
# virtio-fs asks: GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM when MQ is offered (the
# SET_* requests need none: rvmm does not take REPLY_ACK), then GET_VRING_BASE per queue on
# reset.
VU_GET_FEATURES, VU_GET_VRING_BASE, VU_GET_PROTOCOL_FEATURES, VU_GET_QUEUE_NUM = 1, 11, 15, 17
VU_VERSION_1, VU_REPLY = 0x1, 0x4
F_VERSION_1, F_PROTOCOL, F_EVENT_IDX, F_INDIRECT = 1 << 32, 1 << 30, 1 << 29, 1 << 28
P_MQ, P_LOG_SHMFD, P_REPLY_ACK, P_BACKEND_REQ = 1 << 0, 1 << 1, 1 << 3, 1 << 5


def vu_reply(code, body, flags=VU_VERSION_1 | VU_REPLY):
    return struct.pack("<III", code, flags, len(body)) + body


def vu_u64(code, value):
    return vu_reply(code, struct.pack("<Q", value))


def vu_bases(*nums):
    return b"".join(vu_reply(VU_GET_VRING_BASE, struct.pack("<II", i, n)) for i, n in enumerate(nums))


def vhost_user_seeds():
    t = "vhost_user_frontend"
    features = F_VERSION_1 | F_PROTOCOL | F_EVENT_IDX | F_INDIRECT
    # What virtiofsd offers: MQ among others, and both queues.
    virtiofsd = (vu_u64(VU_GET_FEATURES, features)
                 + vu_u64(VU_GET_PROTOCOL_FEATURES, P_MQ | P_LOG_SHMFD | P_REPLY_ACK | P_BACKEND_REQ)
                 + vu_u64(VU_GET_QUEUE_NUM, 2))
    write(t, "virtiofsd", virtiofsd + vu_bases(0, 0))
    write(t, "virtiofsd-trailing", virtiofsd + vu_bases(7, 1 << 15) + vu_bases(0, 0) + bytes(range(32)))
    write(t, "no-protocol-features", vu_u64(VU_GET_FEATURES, F_VERSION_1 | F_EVENT_IDX) + vu_bases(3, 3))
    write(t, "protocol-without-mq", vu_u64(VU_GET_FEATURES, F_VERSION_1 | F_PROTOCOL)
          + vu_u64(VU_GET_PROTOCOL_FEATURES, P_REPLY_ACK) + vu_bases(0, 0))
    write(t, "one-queue", vu_u64(VU_GET_FEATURES, features) + vu_u64(VU_GET_PROTOCOL_FEATURES, P_MQ)
          + vu_u64(VU_GET_QUEUE_NUM, 1))
    write(t, "too-many-queues", vu_u64(VU_GET_FEATURES, features) + vu_u64(VU_GET_PROTOCOL_FEATURES, P_MQ)
          + vu_u64(VU_GET_QUEUE_NUM, 1 << 40))
    write(t, "legacy", vu_u64(VU_GET_FEATURES, F_PROTOCOL))
    write(t, "wrong-reply-code", vu_u64(VU_GET_PROTOCOL_FEATURES, features))
    write(t, "not-a-reply", vu_reply(VU_GET_FEATURES, struct.pack("<Q", features), VU_VERSION_1))
    write(t, "long-body", vu_reply(VU_GET_FEATURES, struct.pack("<QQ", features, 0)) + vu_bases(0, 0))
    write(t, "truncated", vu_u64(VU_GET_FEATURES, features)[:10])


# passt (fuzz/src/bin/passt_stream.rs): a control byte (bits 0-3: log2 of the piece size; 4:
# small receive buffer; 5: small send buffer; 6: peer reads while it sends; 7: peer closes),
# then what passt sends: frames behind 4-byte big-endian lengths.
MAX_FRAME_LEN = 65536 + 14


def passt_frame(payload_len, seed=0):
    eth = b"\x52\x54\x00\x12\x34\x56" + b"\x9a\x55\x9a\x55\x9a\x55" + b"\x08\x00"
    return eth + bytes((i * 13 + seed) & 0xFF for i in range(payload_len))


def wire(frame):
    return struct.pack(">I", len(frame)) + frame


def passt_seeds():
    t = "passt_stream"
    a, b, c = passt_frame(46, 1), passt_frame(1500, 2), passt_frame(300, 3)
    write(t, "two-frames-and-truncated", bytes([12]) + wire(a) + wire(b) + wire(c)[:100])
    write(t, "byte-by-byte", bytes([0x40]) + wire(a) + wire(c))
    write(t, "odd-pieces", bytes([0x43]) + wire(c) + wire(a) + wire(b))
    write(t, "small-buffers", bytes([0x0C | 0x10 | 0x20]) + wire(b) + wire(passt_frame(2000, 4)) + wire(a))
    write(t, "oversize", bytes([0x08]) + wire(a) + struct.pack(">I", MAX_FRAME_LEN + 1) + a)
    write(t, "empty-frames-then-close", bytes([0x82]) + wire(b"") + wire(b"") + wire(a))
    write(t, "prefix-cut", bytes([0x01 | 0x80]) + wire(a) + b"\x00\x00")


# OCI (fuzz/src/bin/oci_config.rs): a bundle's config.json. The bundle has rootfs/; bind
# sources are host paths every Linux has.
def oci_seeds():
    t = "oci_config"
    minimal = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "root": {"path": "rootfs"}}
    write(t, "minimal", json.dumps(minimal).encode())
    podman = {
        "ociVersion": "1.0.2-dev",
        "process": {"args": ["sh", "-c", "id"], "terminal": True, "cwd": "/", "env": ["PATH=/bin"],
                    "apparmorProfile": "containers-default", "selinuxLabel": "x"},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "c1",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/passwd",
             "options": ["bind", "rprivate", "ro"]},
            {"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind"]},
            {"destination": "/data2", "source": "/tmp", "options": ["bind", "ro"]},
            {"destination": "/dev/null2", "type": "bind", "source": "/dev/null", "options": ["bind"]},
        ],
        "hooks": {"prestart": [{"path": "/bin/true"}]},
        "annotations": {"rvmm.cpus": "2", "rvmm.memory_mib": "300"},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"},
                           {"type": "mount", "path": "/proc/1/ns/mnt"}],
            "cgroupsPath": "machine.slice:libpod:abc",
            "resources": {"memory": {"limit": 268435456}, "cpu": {"quota": 150000, "period": 100000},
                          "hugepageLimits": [], "pids": {"limit": 100}},
            "sysctl": {"net.ipv4.ping_group_range": "0 0", "kernel.msgmax": "8192", "net.core.x": 1},
            "mountLabel": "system_u:object_r:container_file_t:s0",
            "intelRdt": {"closID": "x"},
        },
    }
    write(t, "podman", json.dumps(podman, indent=1).encode())
    odd = dict(minimal, annotations={"rvmm.cpus": "99999999999999999999", "rvmm.memory_mib": "0"},
               linux={"resources": {"cpu": {"quota": -1, "period": 0}, "memory": {"limit": -5}},
                      "namespaces": "network", "sysctl": []},
               mounts=[{"type": "bind", "source": "", "destination": 5}, "bind", {"options": ["bind"]}])
    write(t, "odd-types", json.dumps(odd).encode())
    write(t, "root-escapes", json.dumps(dict(minimal, root={"path": "../../../../tmp"})).encode())
    write(t, "bad-annotation", json.dumps(dict(minimal, annotations={"rvmm.memory_mib": "lots"})).encode())
    write(t, "version-2", json.dumps(dict(minimal, ociVersion="2.0.0")).encode())
    write(t, "not-json", b'{"ociVersion": "1.0", "process": {"args": ["sh"]')


# The API socket (fuzz/src/bin/api_request.rs): request lines, one per input line.
def api_seeds():
    t = "api_request"
    ok = [{"request": r} for r in ("status", "pause", "pause", "resume", "shutdown")]
    write(t, "all-requests", b"".join(json.dumps(r).encode() + b"\n" for r in ok))
    write(t, "bad-requests", b'{"request":"pause","x":1}\n{"request":7}\nstatus\n\n')
    snap = [{"request": "pause"}, {"request": "snapshot", "dir": "/s"}, {"request": "snapshot"}]
    write(t, "snapshot", b"".join(json.dumps(r).encode() + b"\n" for r in snap))


def main():
    api_seeds()
    protocol_seeds()
    layer_seeds()
    blk_seeds()
    net_seeds()
    net_rx_seeds()
    vsock_seeds()
    mmio_seeds()
    boot_seeds()
    config_seeds()
    vhost_user_seeds()
    passt_seeds()
    oci_seeds()
    return 0


if __name__ == "__main__":
    sys.exit(main())
