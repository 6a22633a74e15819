//! The guest-controlled part of the virtio-net tx path (chain validation, gathering, header
//! offload checks), without a tap: `net::fuzzing::gather_tx_frame` is exactly what
//! `Net::process_tx` runs before its write to the tap.
#![no_main]

use husk_fuzz::{memory, queue, Input};
use husk_vmm::devices::virtio::net::{fuzzing::gather_tx_frame, MAX_FRAME_LEN, VNET_HDR_LEN};
use husk_vmm::devices::virtio::VIRTIO_F_VERSION_1;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

// VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF.
const OFFERED: [u32; 4] = [0, 11, 12, 15];

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let acked = OFFERED
        .iter()
        .enumerate()
        .filter(|(i, _)| input.knobs[0] & (1 << i) != 0)
        .fold(1u64 << VIRTIO_F_VERSION_1, |f, (_, &b)| f | (1 << b));
    let mem = memory();
    input.lay_out(&mem, 0);
    let mut q = queue(&mem, 0);
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        if let Ok(len) = gather_tx_frame(&mut buf, acked, &mem, chain) {
            assert!((VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len));
        }
        let _ = q.add_used(&mem, head, 0);
    }
});
