//! KVM's own per-vCPU counters (exits, page faults taken, interrupts injected, instructions
//! emulated, …), read through the binary statistics file descriptor (`KVM_GET_STATS_FD`, Linux
//! 5.14+). They say what KVM does with a guest that stopped making progress, which its registers
//! alone do not: a vCPU re-entering the guest at one address and faulting every time looks the same
//! as one spinning there, until `pf_taken` or `insn_emulation` is seen growing.
//!
//! Layout (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"): a header, `num_desc` descriptors
//! of 16 bytes plus `name_size` bytes of name each, and the values (`u64`s) at `data_offset` plus
//! each descriptor's `offset`. Only single-value statistics are returned; histograms are skipped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// Bytes of `struct kvm_stats_header` and of a descriptor without its name.
const HEADER_LEN: usize = 24;
const DESC_LEN: usize = 16;
/// Bounds for what we read: KVM has about 40 vCPU statistics with names under 48 bytes.
const MAX_FILE_LEN: usize = 1 << 20;
const MAX_NAME_LEN: usize = 256;

/// The vCPU's single-value statistics, by name.
pub fn read_vcpu_stats(vcpu: &VcpuFd) -> io::Result<BTreeMap<String, u64>> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file descriptor or -1; the
    // vCPU fd is valid for the call.
    let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us by the kernel and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    // The file has no size (it is not a regular file): read until a short read.
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = file.read_at(&mut chunk, buf.len() as u64)?;
        buf.extend_from_slice(&chunk[..n]);
        if n == 0 || buf.len() >= MAX_FILE_LEN {
            break;
        }
    }
    parse(&buf).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed KVM stats"))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses the stats file; `None` if it is not laid out as documented.
fn parse(b: &[u8]) -> Option<BTreeMap<String, u64>> {
    if b.len() < HEADER_LEN {
        return None;
    }
    let name_size = u32_at(b, 4)? as usize;
    let num_desc = u32_at(b, 8)? as usize;
    let desc_offset = u32_at(b, 16)? as usize;
    let data_offset = u32_at(b, 20)? as usize;
    if name_size == 0 || name_size > MAX_NAME_LEN {
        return None;
    }
    let mut out = BTreeMap::new();
    for i in 0..num_desc {
        let d = desc_offset.checked_add(i.checked_mul(DESC_LEN + name_size)?)?;
        let size = u16_at(b, d + 6)?;
        let offset = u32_at(b, d + 8)? as usize;
        let name = b.get(d + DESC_LEN..d + DESC_LEN + name_size)?;
        let name = name.split(|&c| c == 0).next()?;
        if size != 1 {
            continue;
        }
        let value = u64_at(b, data_offset.checked_add(offset)?)?;
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats file as KVM lays it out: header, id string, descriptors, data.
    fn file(stats: &[(&str, u16, &[u64])]) -> Vec<u8> {
        let name_size = 48usize;
        let desc_offset = HEADER_LEN + name_size; // after the id string
        let data_offset = desc_offset + stats.len() * (DESC_LEN + name_size);
        let mut b = Vec::new();
        for v in [
            0u32,
            name_size as u32,
            stats.len() as u32,
            HEADER_LEN as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(desc_offset as u32).to_le_bytes());
        b.extend_from_slice(&(data_offset as u32).to_le_bytes());
        b.resize(desc_offset, 0);
        let mut offset = 0u32;
        let mut data = Vec::new();
        for (name, size, values) in stats {
            b.extend_from_slice(&0u32.to_le_bytes()); // flags
            b.extend_from_slice(&0i16.to_le_bytes()); // exponent
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes()); // bucket size
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            b.extend_from_slice(&n);
            for v in *values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            offset += 8 * u32::from(*size);
        }
        b.extend_from_slice(&data);
        b
    }

    #[test]
    fn single_values_are_read_and_histograms_skipped() {
        let b = file(&[
            ("exits", 1, &[1234]),
            ("halt_poll_success_hist", 3, &[1, 2, 3]),
            ("pf_taken", 1, &[77]),
        ]);
        let s = parse(&b).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s["exits"], 1234);
        assert_eq!(s["pf_taken"], 77);
    }

    #[test]
    fn reads_the_counters_of_a_real_vcpu() {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let s = read_vcpu_stats(&vcpu).unwrap();
        // A vCPU that never ran has exited zero times, but KVM lists the counter.
        assert_eq!(s.get("exits"), Some(&0), "{s:?}");
        assert!(s.len() > 10, "{s:?}");
    }

    #[test]
    fn truncated_or_absurd_files_are_refused() {
        let b = file(&[("exits", 1, &[1])]);
        for len in [0, 10, HEADER_LEN, b.len() - 1] {
            assert!(parse(&b[..len]).is_none(), "{len}");
        }
        let mut huge_name = b.clone();
        huge_name[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&huge_name).is_none());
        let mut many = b.clone();
        many[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&many).is_none());
    }
}
