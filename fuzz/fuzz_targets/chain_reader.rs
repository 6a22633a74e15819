//! `chain::walk` and `GuestBufs` on arbitrary descriptor chains: validation never panics or
//! loops, and whatever it accepts is non-empty, bounded, and really inside guest memory.
#![no_main]

use husk_fuzz::{memory, queue, Input};
use husk_vmm::devices::virtio::chain::{walk, GuestBufs};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let mem = memory();
    input.lay_out(&mem, 0);
    let mut q = queue(&mem, 0);
    let max = usize::from(input.knobs[0] % 20);
    let offset = u64::from(u16::from_le_bytes([input.knobs[1], input.knobs[2]]));
    let mut chains = 0;
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        chains += 1;
        assert!(
            chains <= usize::from(husk_fuzz::QSIZE),
            "popped more chains than the ring holds"
        );
        let head = chain.head_index();
        if let Ok(descs) = walk(chain, &mem, max) {
            assert!(!descs.is_empty() && descs.len() <= max);
            let mut bufs = GuestBufs::new();
            let mut sum = 0u64;
            for d in &descs {
                assert!(d.len > 0);
                sum += u64::from(d.len);
                bufs.push(d);
            }
            let total = bufs.total();
            assert_eq!(total, sum);
            assert_eq!(bufs.addr_of(0), Some(descs[0].addr));
            assert_eq!(bufs.addr_of(total), None);
            let off = offset % (total + 1);
            let n = usize::try_from(total - off).unwrap().min(4096);
            let mut pieces = 0usize;
            bufs.for_each_piece(off, n as u64, |_, r| {
                assert_eq!(r.start, pieces);
                pieces = r.end;
                Ok::<_, ()>(())
            })
            .unwrap();
            assert_eq!(pieces, n);
            let mut buf = vec![0u8; n];
            bufs.read_at(&mem, off, &mut buf)
                .expect("validated descriptors are readable");
            bufs.write_at(&mem, off, &buf)
                .expect("validated descriptors are writable");
        }
        let _ = q.add_used(&mem, head, 0);
    }
});
