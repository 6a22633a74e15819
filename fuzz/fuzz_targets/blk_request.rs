//! virtio-blk request handling (`Block::process_queue`) on arbitrary chains, against a small
//! image file: requests are parsed, bounds-checked and executed for real.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use husk_fuzz::{memory, queue, scratch_dir, Input};
use husk_vmm::devices::virtio::block::{Block, BlockConfig, SECTOR_SIZE};
use husk_vmm::devices::virtio::{IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

const SECTORS: u64 = 64;

fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = scratch_dir("blk").join("disk.img");
        let data: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        std::fs::write(&path, data).unwrap();
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let mut dev = Block::new(BlockConfig {
        path: image().clone(),
        read_only: input.knobs[0] & 1 != 0,
        id: (input.knobs[0] & 2 != 0).then(|| "fuzz-disk".to_owned()),
    })
    .unwrap();
    assert_eq!(dev.capacity(), SECTORS);
    dev.ack_features(u64::from(u32::from_le_bytes(input.knobs)) | 1 << VIRTIO_F_VERSION_1);
    let mem = memory();
    input.lay_out(&mem, 0);
    dev.activate(
        mem.clone(),
        vec![queue(&mem, 0)],
        vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        IrqTrigger::new().unwrap(),
    )
    .unwrap();
    dev.process_queue();
    dev.settle();
    // A second pass finds nothing new.
    dev.process_queue();
    dev.settle();
});
