//! virtio-vsock tx path (`Vsock::process_tx`: packet parsing, the muxer's connection state
//! machine, then rx delivery of replies) on arbitrary tx chains. Rx buffers are posted by the
//! harness; a host listener on port 1024 accepts guest connections.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use husk_fuzz::{memory, post_buffers, queue, scratch_dir, Input, VRING_DESC_F_WRITE};
use husk_vmm::devices::virtio::vsock::Vsock;
use husk_vmm::devices::virtio::{IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u64 = 3;
/// virtio-vsock packet header length.
const HDR_LEN: u32 = 44;
/// Guest connections to this host port reach `HOST.1`.
const HOST_PORT: u32 = 1024;

fn host() -> &'static (PathBuf, UnixListener) {
    static HOST: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    HOST.get_or_init(|| {
        let uds = scratch_dir("vsock").join("v.sock");
        let mut port = uds.clone().into_os_string();
        port.push(format!("_{HOST_PORT}"));
        let _ = std::fs::remove_file(&port);
        let listener = UnixListener::bind(&port).unwrap();
        listener.set_nonblocking(true).unwrap();
        (uds, listener)
    })
}

fuzz_target!(|data: &[u8]| {
    let (uds, listener) = host();
    let input = Input::parse(data);
    let mut dev = Vsock::new(GUEST_CID, uds.clone()).unwrap();
    dev.ack_features(1 << VIRTIO_F_VERSION_1);
    let mem = memory();
    // Queues: rx (0), tx (1, fuzzed), event (2, empty).
    let rx_bufs = u16::from(input.knobs[0] % 8);
    let rx_len = HDR_LEN + u32::from(input.knobs[1]) * 16;
    post_buffers(&mem, 0, rx_bufs, rx_len, VRING_DESC_F_WRITE);
    input.lay_out(&mem, 1);
    dev.activate(
        mem.clone(),
        vec![queue(&mem, 0), queue(&mem, 1), queue(&mem, 2)],
        (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
        IrqTrigger::new().unwrap(),
    )
    .unwrap();
    dev.process_tx();
    dev.process_muxer();
    dev.process_rx();
    drop(dev);
    // Close what the guest opened, so the backlog never fills.
    while listener.accept().is_ok() {}
});
