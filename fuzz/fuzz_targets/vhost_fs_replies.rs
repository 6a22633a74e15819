//! The virtio-fs device's vhost-user frontend against a hostile or broken daemon: the fuzz input
//! is the byte stream the "daemon" answers with (headers, bodies, truncations, wrong request codes,
//! absurd sizes and values), read by the frontend through the real `vhost` crate during
//! negotiation, activation (memory table, vrings) and reset. None of it may panic the VMM.
//!
//! Input layout:
//!
//! ```text
//! [guest_features: u64 LE]  what the guest driver acks (masked by the device to what it offered)
//! [queues: u8]              bit 0 / bit 1: queue 0 / 1 made ready by the driver
//! [replies: the rest]       everything the daemon sends, pre-queued on the socket
//! ```
//!
//! The replies are written before the frontend starts and the daemon's end is then shut down for
//! writing, so a frontend waiting for more sees end-of-file at once instead of its 5 s timeout.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use husk_fuzz::{queue, ring_addrs};
use husk_vmm::devices::virtio::fs::fuzzing;
use husk_vmm::devices::virtio::GuestMemory;
use husk_vmm::memory::{create_guest_memory_with, MemoryBacking};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

/// 1 MiB of guest RAM behind a sealed memfd, as with a configured share (the frontend sends
/// the daemon this fd in SET_MEM_TABLE). Shared by all runs: the fake daemon never maps it.
fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        // libFuzzer's own main runs instead of Rust's, which would have ignored SIGPIPE: a write
        // to a peer that went away must fail with EPIPE, not kill the fuzzer.
        // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        create_guest_memory_with(1, MemoryBacking::SharedMemfd).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut features = [0u8; 8];
    let n = data.len().min(8);
    features[..n].copy_from_slice(&data[..n]);
    let guest_features = u64::from_le_bytes(features);
    let ready = data.get(8).copied().unwrap_or(0b11);
    let replies = data.get(9..).unwrap_or(&[]);

    let mem = memory();
    let queues = (0..2u64)
        .map(|q| {
            // Zeroed rings, like a driver that just set them up.
            let (desc, _, _) = ring_addrs(q);
            mem.write_slice(&[0u8; 0x400], GuestAddress(desc)).unwrap();
            let mut queue = queue(mem, q);
            queue.set_ready(ready & (1 << q) != 0);
            queue
        })
        .collect();

    let (frontend, mut daemon) = UnixStream::pair().unwrap();
    // A socket buffer holds far more than any fuzz input; if not, the tail is simply lost.
    daemon.set_nonblocking(true).unwrap();
    let _ = daemon.write_all(replies);
    let _ = daemon.shutdown(std::net::Shutdown::Write);
    let outcome = fuzzing::session(frontend, mem, queues, guest_features);
    // For checking what the seeds reach: `HUSK_FUZZ_VERBOSE=1 cargo fuzz run vhost_fs_replies SEED`.
    if std::env::var_os("HUSK_FUZZ_VERBOSE").is_some() {
        eprintln!("session: {outcome:?}");
    }
    // `daemon` lives until here: the frontend's own requests never hit a closed peer.
    drop(daemon);
});
