//! The guest-controlled part of the virtio-net rx path, without a tap: the rx chains the guest
//! posts (validated, reserved, merged with VIRTIO_NET_F_MRG_RXBUF or not) and the frames written
//! into them with their virtio-net header. `net::fuzzing::receive_frames` runs the device's own
//! rx wakeup (`run_rx`, as `rx_queue_notified` calls it) with frames from the input in place of
//! tap reads.
//!
//! Input: the `husk_fuzz::Input` layout for the rx queue; knobs[0] bit 0/1/2 ack
//! MRG_RXBUF/GUEST_CSUM/EVENT_IDX, knobs[1] % 3 + 1 is the number of wakeups. The payload is
//! the frames: `[len: u16 LE][up to len bytes]...`, bytes missing at the end of the input
//! filled with a pattern, so that large frames need no large inputs.
//!
//! Checked against an independent reading of the raw descriptor table: the device writes only
//! into the device-writable buffers of chains it returns, and only their first `len` bytes; used
//! lengths add up to the frames delivered; every delivered frame is one of the input frames, in
//! order, with the header's `num_buffers` set (and DATA_VALID cleared without GUEST_CSUM).
#![no_main]

use husk_fuzz::{
    memory, queue, ring_addrs, Input, QSIZE, REGION0, REGION1, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use husk_vmm::devices::virtio::net::fuzzing::receive_frames;
use husk_vmm::devices::virtio::net::VNET_HDR_LEN;
use husk_vmm::devices::virtio::{GuestMemory, IrqTrigger, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MRG_RXBUF: u32 = 15;
const GUEST_CSUM: u32 = 1;
const EVENT_IDX: u32 = 29;
const DATA_VALID: u8 = 2;
const INDIRECT: u16 = 4;
/// Longest chain the device accepts (net::MAX_CHAIN_DESCS).
const MAX_CHAIN: usize = 64;
/// Rings of queue 0 live below this address; buffers are expected above it.
const RINGS_END: u64 = 0x1000;
const MAX_FRAMES: usize = 64;
const MAX_FRAME_BYTES: usize = 256 * 1024;

fn frames(mut p: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut total = 0;
    while p.len() >= 2 && out.len() < MAX_FRAMES && total < MAX_FRAME_BYTES {
        let len = usize::from(u16::from_le_bytes([p[0], p[1]]));
        p = &p[2..];
        let have = len.min(p.len());
        let mut f = p[..have].to_vec();
        p = &p[have..];
        let k = out.len() as u8;
        f.extend((have..len).map(|i| (i as u8).wrapping_mul(7) ^ k));
        total += len;
        out.push(f);
    }
    out
}

fn snapshot(mem: &GuestMemory) -> Vec<(u64, Vec<u8>)> {
    [REGION0, REGION1]
        .iter()
        .map(|&(base, len)| {
            let mut v = vec![0u8; len];
            mem.read_slice(&mut v, GuestAddress(base)).unwrap();
            (base, v)
        })
        .collect()
}

fn in_memory(addr: u64, len: u32) -> bool {
    let Some(end) = addr.checked_add(u64::from(len)) else {
        return false;
    };
    [REGION0, REGION1]
        .iter()
        .any(|&(base, size)| addr >= base && end <= base + size as u64)
}

struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The device-writable buffers of the chain at `head`, if the device may write into it: every
/// descriptor writable, non-empty and in memory, no loop, at most MAX_CHAIN of them.
fn writable_chain(table: &[Desc], head: u16) -> Option<Vec<(u64, u32)>> {
    let mut seen = Vec::new();
    let mut i = head;
    loop {
        let d = table.get(usize::from(i))?;
        if seen.contains(&i) || seen.len() == MAX_CHAIN {
            return None;
        }
        seen.push(i);
        if d.len == 0 || d.flags & VRING_DESC_F_WRITE == 0 || !in_memory(d.addr, d.len) {
            return None;
        }
        if d.flags & VRING_DESC_F_NEXT == 0 {
            return Some(
                seen.iter()
                    .map(|&j| {
                        let d = &table[usize::from(j)];
                        (d.addr, d.len)
                    })
                    .collect(),
            );
        }
        i = d.next;
    }
}

/// The first `len` bytes of the stream of `bufs`, as (address, length) pieces.
fn prefix(bufs: &[(u64, u32)], mut len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, l) in bufs {
        if len == 0 {
            break;
        }
        let n = len.min(u64::from(l));
        out.push((a, n));
        len -= n;
    }
    out
}

fn read(snap: &[(u64, Vec<u8>)], addr: u64, len: u64) -> &[u8] {
    let (base, v) = snap
        .iter()
        .find(|(b, v)| addr >= *b && addr + len <= b + v.len() as u64)
        .expect("checked to be in memory");
    &v[(addr - base) as usize..(addr - base + len) as usize]
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let k = input.knobs[0];
    let (mrg, csum) = (k & 1 != 0, k & 2 != 0);
    let mut acked = 1u64 << VIRTIO_F_VERSION_1;
    for (on, bit) in [
        (mrg, MRG_RXBUF),
        (csum, GUEST_CSUM),
        (k & 4 != 0, EVENT_IDX),
    ] {
        if on {
            acked |= 1 << bit;
        }
    }
    let wakeups = usize::from(input.knobs[1] % 3) + 1;
    let frames = frames(input.payload);

    let mem = memory();
    // Non-zero buffers, so that written zeroes show.
    mem.write_slice(
        &vec![0xa5; REGION0.1 - RINGS_END as usize],
        GuestAddress(RINGS_END),
    )
    .unwrap();
    mem.write_slice(&vec![0xa5; REGION1.1], GuestAddress(REGION1.0))
        .unwrap();
    input.lay_out(&mem, 0);
    let before = snapshot(&mem);
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let run = receive_frames(
        &mem,
        queue(&mem, 0),
        acked,
        IrqTrigger::new().unwrap(),
        &refs,
        wakeups,
    );
    let after = snapshot(&mem);
    // For checking what the seeds reach: `HUSK_FUZZ_VERBOSE=1 cargo fuzz run net_rx SEED`.
    if std::env::var_os("HUSK_FUZZ_VERBOSE").is_some() {
        eprintln!("{} frames: {run:?}", frames.len());
    }

    let s = run.stats;
    assert_eq!(
        s.rx_frames + s.rx_dropped + u64::from(run.pending),
        run.taken as u64,
        "{run:?}"
    );
    assert!(run.taken <= frames.len());
    if run.broken.is_none() && !run.stalled && !run.pending {
        // Nothing stopped it: every frame was taken.
        assert_eq!(run.taken, frames.len(), "{run:?}");
    }

    let table: Vec<Desc> = (0..usize::from(QSIZE))
        .map(|i| {
            let d = input.descs.get(i).copied().unwrap_or([0; 16]);
            Desc {
                addr: u64::from_le_bytes(d[0..8].try_into().unwrap()),
                len: u32::from_le_bytes(d[8..12].try_into().unwrap()),
                flags: u16::from_le_bytes([d[12], d[13]]),
                next: u16::from_le_bytes([d[14], d[15]]),
            }
        })
        .collect();
    // A guest may point its rx buffers at its own rings (the device then reads descriptors the
    // frames overwrote) or use indirect tables: the reading below cannot follow that.
    let simple = table.iter().all(|d| {
        d.flags & INDIRECT == 0
            && (d.len == 0 || d.flags & VRING_DESC_F_WRITE == 0 || d.addr >= RINGS_END)
    });
    if !simple {
        return;
    }
    let (_, _, used) = ring_addrs(0);
    let n_used: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    assert!(
        usize::from(n_used) <= input.ring.len(),
        "{n_used} used of {}",
        input.ring.len()
    );
    let mut entries = Vec::new();
    let mut allowed: Vec<(u64, u64)> = Vec::new();
    for i in 0..u64::from(n_used) {
        let id: u32 = mem.read_obj(GuestAddress(used + 4 + 8 * i)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(used + 8 + 8 * i)).unwrap();
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < QSIZE)
            .expect("used id beyond queue");
        let pieces = if len > 0 {
            let bufs = writable_chain(&table, head)
                .unwrap_or_else(|| panic!("chain {head} got {len} bytes but is not writable"));
            let total: u64 = bufs.iter().map(|b| u64::from(b.1)).sum();
            assert!(
                total >= VNET_HDR_LEN as u64 && u64::from(len) <= total,
                "{len} > {total}"
            );
            prefix(&bufs, u64::from(len))
        } else {
            Vec::new()
        };
        allowed.extend(&pieces);
        entries.push((len, pieces));
    }
    let lens: u64 = entries.iter().map(|e| u64::from(e.0)).sum();
    assert_eq!(
        lens,
        s.rx_bytes + VNET_HDR_LEN as u64 * s.rx_frames,
        "{run:?}"
    );
    let chunks = entries.iter().filter(|e| e.0 > 0).count() as u64;
    assert_eq!(entries.len() as u64 - chunks, s.rx_malformed, "{run:?}");
    if mrg {
        assert!(chunks >= s.rx_frames);
    } else {
        assert_eq!(chunks, s.rx_frames);
    }

    // Nothing written outside the used ring and the used prefixes of returned chains.
    let used_ring = (used, 6 + 8 * u64::from(QSIZE));
    for ((base, b), (_, a)) in before.iter().zip(&after) {
        for (off, (x, y)) in b.iter().zip(a).enumerate() {
            if x != y {
                let addr = base + off as u64;
                let inside = |&(s, l): &(u64, u64)| addr >= s && addr < s + l;
                assert!(
                    inside(&used_ring) || allowed.iter().any(inside),
                    "byte at {addr:#x} written outside the returned buffers"
                );
            }
        }
    }

    // Frame contents, if no two returned buffers overlap (else later frames overwrite earlier).
    let mut sorted = allowed.clone();
    sorted.sort();
    if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return;
    }
    let mut next_src = 0;
    let mut delivered = 0;
    let mut it = entries.iter().filter(|e| e.0 > 0).peekable();
    while let Some((_, pieces)) = it.next() {
        let mut frame: Vec<u8> = pieces
            .iter()
            .flat_map(|&(a, l)| read(&after, a, l).to_vec())
            .collect();
        let nbufs = u16::from_le_bytes([frame[10], frame[11]]);
        assert!(nbufs >= 1 && (mrg || nbufs == 1), "num_buffers {nbufs}");
        for _ in 1..nbufs {
            let (_, more) = it.next().expect("fewer buffers than num_buffers");
            frame.extend(more.iter().flat_map(|&(a, l)| read(&after, a, l).to_vec()));
        }
        let matches = |src: &[u8]| {
            let mut want = src.to_vec();
            want[10..12].copy_from_slice(&nbufs.to_le_bytes());
            if !csum {
                want[0] &= !DATA_VALID;
            }
            want == frame
        };
        let j = (next_src..frames.len())
            .find(|&j| frames[j].len() >= VNET_HDR_LEN && matches(&frames[j]))
            .expect("delivered frame is not one of the input frames, in order");
        next_src = j + 1;
        delivered += 1;
    }
    assert_eq!(delivered, s.rx_frames);
});
