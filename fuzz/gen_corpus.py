#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (see src/lib.rs for the input layout)."""
import os
import struct

NEXT, WRITE = 1, 2
PAYLOAD = 0x1000
HERE = os.path.dirname(os.path.abspath(__file__))


def seed(knobs, descs, ring, payload=b"", avail_idx=None):
    """descs: (addr, len, flags, next); payload lands at guest address PAYLOAD."""
    out = bytes(knobs) + bytes([len(descs), len(ring) if avail_idx is None else avail_idx])
    out += b"".join(struct.pack("<QIHH", *d) for d in descs)
    out += b"".join(struct.pack("<H", h) for h in ring)
    return out + payload


def at(buf, off, data):
    """Places `data` at guest address PAYLOAD + off of a payload buffer."""
    buf = bytearray(buf)
    if len(buf) < off + len(data):
        buf += bytes(off + len(data) - len(buf))
    buf[off:off + len(data)] = data
    return bytes(buf)


def chain_reader():
    yield "two_descs", seed([16, 1, 0, 0], [(0x1000, 3, NEXT, 1), (0x1100, 5, WRITE, 0)], [0],
                            b"abcdefgh")
    yield "two_chains", seed([4, 0, 0, 0], [(0x1000, 8, 0, 0), (0x1008, 8, NEXT, 2),
                                            (0x1010, 8, WRITE, 0)], [0, 1], bytes(range(24)))
    yield "loop", seed([16, 0, 0, 0], [(0x1000, 4, NEXT, 1), (0x1004, 4, NEXT, 0)], [0])
    yield "straddles_hole", seed([16, 0, 0, 0], [(0xfff0, 0x20, WRITE, 0)], [0])
    yield "bad_avail_idx", seed([16, 0, 0, 0], [(0x1000, 4, 0, 0)], [0], avail_idx=200)


def net_tx():
    frame = bytes(12) + b"\xff" * 6 + b"\x02HUSK\x01" + b"\x88\xb5" + b"hello, tap" + bytes(36)
    yield "one_desc", seed([0, 0, 0, 0], [(0x1000, len(frame), 0, 0)], [0], frame)
    yield "split_header", seed([0, 0, 0, 0], [(0x1000, 5, NEXT, 1), (0x1005, len(frame) - 5, 0, 0)],
                               [0], frame)
    csum = bytes([1, 0]) + bytes(10) + frame[12:]
    yield "csum_offload", seed([1, 0, 0, 0], [(0x1000, len(csum), 0, 0)], [0], csum)
    tso = bytes([1, 1]) + bytes(10) + frame[12:]
    yield "tso4", seed([3, 0, 0, 0], [(0x1000, len(tso), 0, 0)], [0], tso)
    yield "writable", seed([0, 0, 0, 0], [(0x1000, len(frame), WRITE, 0)], [0], frame)


def blk_request():
    IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13

    def hdr(t, sector):
        return struct.pack("<IIQ", t, 0, sector)

    # Header at 0x1000, status byte at 0x1010, data at 0x1200.
    three = lambda n, dflags: [(0x1000, 16, NEXT, 1), (0x1200, n, dflags | NEXT, 2),
                               (0x1010, 1, WRITE, 0)]
    yield "read", seed([0, 0, 0, 0], three(1024, WRITE), [0], hdr(IN, 3))
    yield "write", seed([0, 0, 0, 0], three(512, 0), [0],
                        at(hdr(OUT, 5), 0x200, b"\x5a" * 512))
    yield "write_ro", seed([1, 0, 0, 0], three(512, 0), [0], at(hdr(OUT, 5), 0x200, b"\x5a" * 512))
    yield "flush", seed([0, 0, 0, 0], [(0x1000, 16, NEXT, 1), (0x1010, 1, WRITE, 0)], [0],
                        hdr(FLUSH, 0))
    yield "get_id", seed([2, 0, 0, 0], three(20, WRITE), [0], hdr(GET_ID, 0))
    seg = struct.pack("<QII", 2, 4, 0)
    yield "discard", seed([0, 0, 0, 0], three(16, 0), [0], at(hdr(DISCARD, 0), 0x200, seg))
    yield "write_zeroes", seed([0, 0, 0, 0], three(16, 0), [0],
                               at(hdr(WRITE_ZEROES, 0), 0x200, seg))
    yield "read_past_end", seed([0, 0, 0, 0], three(1024, WRITE), [0], hdr(IN, 63))


def vsock_tx():
    REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7

    def hdr(op, dst_port=1024, length=0, src_cid=3, dst_cid=2, flags=0):
        return struct.pack("<QQIIIHHIII", src_cid, dst_cid, 50000, dst_port, length, 1, op,
                           flags, 1 << 20, 0)

    knobs = [4, 0x40, 0, 0]
    p = at(b"", 0x000, hdr(REQUEST))
    p = at(p, 0x040, hdr(RW, length=5))
    p = at(p, 0x080, b"hello")
    p = at(p, 0x0c0, hdr(CREDIT_REQUEST))
    p = at(p, 0x100, hdr(SHUTDOWN, flags=3))
    p = at(p, 0x140, hdr(RST))
    descs = [(0x1000, 44, 0, 0), (0x1040, 44, NEXT, 2), (0x1080, 5, 0, 0),
             (0x10c0, 44, 0, 0), (0x1100, 44, 0, 0), (0x1140, 44, 0, 0)]
    yield "connect_rw_shutdown", seed(knobs, descs, [0, 1, 3, 4, 5], p)
    # Header and payload in one descriptor.
    p = at(at(b"", 0, hdr(REQUEST)), 0x40, hdr(RW, length=3) + b"abc")
    yield "rw_one_desc", seed(knobs, [(0x1000, 44, 0, 0), (0x1040, 47, 0, 0)], [0, 1], p)
    yield "no_listener", seed(knobs, [(0x1000, 44, 0, 0)], [0], hdr(REQUEST, dst_port=5000))
    yield "wrong_cid", seed(knobs, [(0x1000, 44, 0, 0)], [0], hdr(REQUEST, src_cid=7))
    yield "no_rx_buffers", seed([0, 0, 0, 0], [(0x1000, 44, 0, 0)], [0], hdr(REQUEST))
    yield "split_header", seed(knobs, [(0x1000, 20, NEXT, 1), (0x1014, 24, 0, 0)], [0],
                               hdr(CREDIT_UPDATE))
    yield "response_unknown", seed(knobs, [(0x1000, 44, 0, 0)], [0], hdr(RESPONSE))


def vhost_fs_replies():
    """Reply streams of a vhost-user-fs daemon (see fuzz_targets/vhost_fs_replies.rs)."""
    GET_FEATURES, SET_FEATURES, SET_MEM_TABLE = 1, 2, 5
    SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
    SET_VRING_KICK, SET_VRING_CALL, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM = 12, 13, 15, 17
    SET_VRING_ENABLE = 18
    VERSION, REPLY = 0x1, 0x4
    VERSION_1, EVENT_IDX, PROTOCOL_FEATURES = 1 << 32, 1 << 29, 1 << 30
    MQ, REPLY_ACK = 0x1, 0x8

    def reply(code, body, flags=VERSION | REPLY, size=None):
        return struct.pack("<III", code, flags, len(body) if size is None else size) + body

    u64 = lambda v: struct.pack("<Q", v)
    ack = lambda code: reply(code, u64(0))
    head = lambda guest, ready=0b11: struct.pack("<QB", guest, ready)
    guest = VERSION_1 | EVENT_IDX

    def activation(acks):
        out = ack(SET_FEATURES) + ack(SET_MEM_TABLE) if acks else b""
        for _ in range(2):
            for code in (SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL,
                         SET_VRING_KICK, SET_VRING_ENABLE):
                out += ack(code) if acks else b""
        return out

    def reset():
        return b"".join(reply(GET_VRING_BASE, struct.pack("<II", i, 0)) for i in range(2))

    nego = (reply(GET_FEATURES, u64(VERSION_1 | EVENT_IDX | PROTOCOL_FEATURES))
            + reply(GET_PROTOCOL_FEATURES, u64(MQ | REPLY_ACK))
            + reply(GET_QUEUE_NUM, u64(2)))
    # What virtiofsd answers, start to end.
    yield "virtiofsd_session", head(guest) + nego + activation(True) + reset()
    # No protocol features: no acks, no queue count; only GET_* requests are answered.
    yield "no_protocol_features", head(guest) + reply(GET_FEATURES, u64(VERSION_1)) + reset()
    # Only one of the two queues made ready by the driver.
    one = ack(SET_FEATURES) + ack(SET_MEM_TABLE) + b"".join(
        ack(c) for c in (SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL,
                         SET_VRING_KICK, SET_VRING_ENABLE))
    yield "one_queue_ready", head(guest, 0b01) + nego + one + reset()
    yield "too_few_queues", head(guest) + nego[:-20] + reply(GET_QUEUE_NUM, u64(1))
    yield "no_version_1", head(guest) + reply(GET_FEATURES, u64(PROTOCOL_FEATURES))
    # Failure acks (non-zero) during activation.
    yield "nack_mem_table", head(guest) + nego + ack(SET_FEATURES) + reply(SET_MEM_TABLE, u64(1))
    # A reply for the wrong request, a reply without the REPLY flag, an oversized body.
    yield "wrong_code", head(guest) + reply(GET_PROTOCOL_FEATURES, u64(VERSION_1))
    yield "no_reply_flag", head(guest) + reply(GET_FEATURES, u64(VERSION_1), flags=VERSION)
    yield "huge_size", head(guest) + reply(GET_FEATURES, u64(VERSION_1), size=0xffffffff)
    # The daemon hangs up in the middle of activation.
    yield "hangs_up", head(guest) + nego + ack(SET_FEATURES) + ack(SET_MEM_TABLE)[:7]
    # GET_VRING_BASE answered for the wrong ring and with a short body.
    yield "bad_vring_base", head(guest) + nego + activation(True) + reply(
        GET_VRING_BASE, struct.pack("<II", 7, 0xffff)) + reply(GET_VRING_BASE, b"\x01\x00")


def net_rx():
    """Rx chains on queue 0; the payload is the frames: [len u16 LE][bytes] (see net_rx.rs)."""
    MRG, CSUM, EVENT_IDX = 1, 2, 4

    def frame(n, seed=0, hdr=bytes(12)):
        body = b"\x02HUSK\x01" + b"\x02HUSK\x02" + b"\x88\xb5"
        body += bytes((i * 31 + seed) & 0xff for i in range(n))
        return hdr + body

    def frames(*fs):
        return b"".join(struct.pack("<H", len(f)) + f for f in fs)

    bufs = lambda n, size, base=0x2000: [(base + i * size, size, WRITE, 0) for i in range(n)]
    yield "mrg_one_frame", seed([MRG, 0, 0, 0], bufs(4, 2048), [0, 1, 2, 3], frames(frame(100)))
    yield "mrg_spans_small_buffers", seed([MRG, 0, 0, 0], bufs(8, 64), list(range(8)),
                                          frames(frame(286, 3)))
    yield "no_mrg_must_fit_one", seed([0, 0, 0, 0], bufs(2, 256), [0, 1],
                                      frames(frame(400, 5), frame(100, 6)))
    chain = [(0x2000, 20, WRITE | NEXT, 1), (0x3000, 100, WRITE | NEXT, 2), (0x4000, 2000, WRITE, 0)]
    yield "chained_descriptors", seed([0, 0, 0, 0], chain, [0], frames(frame(500, 1)))
    bad = [(0x2000, 2048, 0, 0), (0x2800, 8, WRITE, 0), (0x3000, 0, WRITE, 0),
           (0xfff0, 0x40, WRITE, 0), (0x4000, 2048, WRITE, 0)]
    yield "malformed_then_good", seed([MRG, 0, 0, 0], bad, [0, 1, 2, 3, 4], frames(frame(60, 2)))
    # A 64 KiB TSO frame over sixteen 4 KiB buffers in the second region; the frame bytes past
    # its header come from the pattern (the length says 65535, the input stops early).
    tso = frame(40, 9, hdr=bytes([1, 1]) + bytes(10))
    yield "tso_64k", seed([MRG | CSUM, 0, 0, 0], bufs(16, 4096, 0x2_0000), list(range(16)),
                          struct.pack("<H", 65535) + tso)
    yield "runt_then_stall", seed([MRG, 1, 0, 0], bufs(1, 2048), [0],
                                  frames(b"\x00" * 10, frame(100), frame(200), frame(300)))
    yield "data_valid_without_csum", seed([MRG, 0, 0, 0], bufs(2, 2048), [0, 1],
                                          frames(frame(80, 4, hdr=bytes([2]) + bytes(11))))
    yield "event_idx_two_wakeups", seed([MRG | EVENT_IDX, 1, 0, 0], bufs(3, 1024), [0, 1, 2],
                                        frames(frame(900), frame(900), frame(900), frame(50)))
    yield "no_buffers", seed([MRG, 2, 0, 0], [], [], frames(frame(100)))
    yield "bad_avail_idx", seed([MRG, 0, 0, 0], bufs(2, 2048), [0, 1], frames(frame(100)),
                                avail_idx=40)


def mmio_transport():
    """MMIO access sequences against virtio-blk / virtio-vsock (see mmio_transport.rs)."""
    BLK, VSOCK = 0, 1
    SIZE = {1: 0, 2: 1, 4: 2, 8: 3}

    def R(off, size=4):
        return bytes([SIZE[size]]) + struct.pack("<H", off)

    def W(off, val, size=4):
        return bytes([SIZE[size] | 4]) + struct.pack("<H", off) + val.to_bytes(size, "little")

    def M(addr, data):
        out = b""
        while data:
            out += bytes([8]) + struct.pack("<HB", addr, len(data[:255])) + data[:255]
            addr, data = addr + 255, data[255:]
        return out

    T = bytes([12])

    def negotiate(low):
        out = W(0x70, 1) + W(0x70, 3)
        for sel in (0, 1):
            out += W(0x14, sel) + R(0x10)
        out += W(0x24, 0) + W(0x20, low) + W(0x24, 1) + W(0x20, 1)  # high word: VERSION_1
        return out + W(0x70, 11) + R(0x70)

    def queue(q, size=16):
        d, a, u = q * 0x400, q * 0x400 + 0x100, q * 0x400 + 0x200
        return (W(0x30, q) + R(0x34) + W(0x38, size) + W(0x80, d) + W(0x84, 0) + W(0x90, a)
                + W(0x94, 0) + W(0xa0, u) + W(0xa4, 0) + W(0x44, 1) + R(0x44))

    def descs(q, ds):
        return M(q * 0x400, b"".join(struct.pack("<QIHH", *d) for d in ds))

    def avail(q, heads, idx=None):
        n = len(heads) if idx is None else idx
        return M(q * 0x400 + 0x100, struct.pack("<HH", 0, n) + b"".join(
            struct.pack("<H", h) for h in heads))

    blk_feats = (1 << 2) | (1 << 6) | (1 << 9) | (1 << 29)
    blk_up = negotiate(blk_feats) + queue(0) + W(0x70, 15) + R(0x70)
    hdr = lambda t, sector: struct.pack("<IIQ", t, 0, sector)
    req3 = lambda n, dflags: [(0x1000, 16, NEXT, 1), (0x1200, n, dflags | NEXT, 2),
                              (0x1010, 1, WRITE, 0)]
    cfg = R(0x100, 8) + R(0x108, 4) + R(0x114, 2) + R(0x117, 1) + R(0x1000, 8)
    yield "blk_read", bytes([BLK]) + blk_up + cfg + M(0x1000, hdr(0, 3)) + descs(0, req3(512, WRITE)) \
        + avail(0, [0]) + W(0x50, 0) + T + R(0x60) + W(0x64, 1) + R(0x60) + W(0x70, 0) + R(0x70)
    yield "blk_write_flush", bytes([BLK]) + blk_up + M(0x1000, hdr(1, 5)) + M(0x1200, b"\x77" * 512) \
        + descs(0, req3(512, 0) + [(0x1020, 16, NEXT, 4), (0x1030, 1, WRITE, 0)]) \
        + M(0x1020, hdr(4, 0)) + avail(0, [0, 3]) + W(0x50, 0) + T + T
    yield "blk_read_only", bytes([2]) + blk_up + M(0x1000, hdr(1, 5)) + descs(0, req3(512, 0)) \
        + avail(0, [0]) + W(0x50, 0) + T
    yield "blk_bad_accesses", bytes([BLK]) + W(0x70, 4) + W(0x70, 15) + W(0x20, 1) + W(0x38, 8) \
        + R(0x70, 2) + W(0x71, 1, 1) + W(0x72, 3, 2) + R(0x10, 8) + W(0x100, 1, 8) + R(0xfff0) \
        + W(0x70, 1) + W(0x70, 3) + W(0x30, 7) + R(0x34) + W(0x50, 0) + W(0x64, 3) + R(0xfc) \
        + R(0xb0) + W(0x14, 9) + R(0x10) + W(0x70, 0)
    yield "blk_no_version_1", bytes([BLK]) + W(0x70, 1) + W(0x70, 3) + W(0x20, blk_feats) \
        + W(0x70, 11) + R(0x70) + W(0x70, 15) + R(0x70)
    yield "blk_queue_outside_memory", bytes([BLK]) + negotiate(blk_feats) + queue(0) \
        + W(0x80, 0xffff0000) + W(0x38, 256) + W(0x38, 3) + W(0x70, 15) + R(0x70) + W(0x70, 15) \
        + W(0x70, 0) + blk_up
    yield "blk_broken_ring", bytes([BLK]) + blk_up + avail(0, [0], idx=100) + W(0x50, 0) + T \
        + R(0x70) + R(0x60) + W(0x70, 0x4f) + W(0x70, 0) + blk_up
    yield "blk_failed", bytes([BLK]) + W(0x70, 1) + W(0x70, 0x81) + W(0x70, 3) + R(0x70) + W(0x70, 0)
    yield "blk_queue_changes_after_driver_ok", bytes([BLK]) + blk_up + W(0x38, 32) + W(0x44, 0) \
        + W(0x80, 0x5000) + M(0x1000, hdr(8, 0)) + descs(0, req3(20, WRITE)) + avail(0, [0]) \
        + W(0x50, 0) + W(0x50, 5) + T

    vs_up = negotiate(0) + queue(0) + queue(1) + queue(2) + W(0x70, 15) + R(0x70)
    pkt = lambda op, length=0, flags=0: struct.pack("<QQIIIHHIII", 3, 2, 50000, 1024, length, 1, op,
                                                    flags, 1 << 20, 0)
    rx = descs(0, [(0x2000 + i * 0x100, 0x100, WRITE, 0) for i in range(4)]) + avail(0, range(4))
    tx = M(0x3000, pkt(1)) + M(0x3040, pkt(5, 5) + b"hello") + M(0x3080, pkt(4, flags=3)) \
        + descs(1, [(0x3000, 44, 0, 0), (0x3040, 49, 0, 0), (0x3080, 44, 0, 0)]) \
        + avail(1, [0, 1, 2])
    yield "vsock_connect", bytes([VSOCK]) + vs_up + cfg + rx + W(0x50, 0) + tx + W(0x50, 1) + T + T \
        + R(0x60) + W(0x64, 1) + W(0x70, 0)


for target in (chain_reader, net_tx, blk_request, vsock_tx, vhost_fs_replies, net_rx,
               mmio_transport):
    d = os.path.join(HERE, "corpus", target.__name__)
    os.makedirs(d, exist_ok=True)
    for name, data in target():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
