//! Guest physical memory: the address map and the creation of guest RAM.
//!
//! ```text
//! 0x0000_0000  real-mode area: GDT/IDT, zero page, boot stack, page tables, cmdline
//! 0x0009_fc00  MP table (last KiB of base memory, where Linux looks for it)
//! 0x000a_0000  legacy hole (not RAM in the e820 map)
//! 0x0010_0000  high memory: the kernel at 16 MiB, the initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO gap: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

pub type GuestMemory = GuestMemoryMmap<()>;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
pub const MPTABLE_START: u64 = 0x9_fc00;
pub const EBDA_END: u64 = 0xa_0000;
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB window each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, inside the MMIO gap.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The smallest guest the boot layout supports (kernel at 16 MiB plus room to decompress and run).
pub const MIN_MEM_MIB: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot create the memfd behind {mib} MiB of shared guest memory: {what}: {source}")]
    Memfd {
        mib: u64,
        what: &'static str,
        source: std::io::Error,
    },
}

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Anonymous private memory: the default.
    Anonymous,
    /// A sealed memfd mapped shared, so that a vhost-user daemon can map the same pages (needed
    /// for virtio-fs). The seals keep the daemon from shrinking the file under the VMM (which
    /// would turn guest memory accesses into SIGBUS).
    SharedMemfd,
}

/// The RAM ranges for a guest of `mem_bytes`, leaving the 32-bit MMIO gap free.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Allocates anonymous, private guest RAM (not touched until the guest uses it).
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemory, MemoryError> {
    create_guest_memory_with(mem_mib, MemoryBacking::Anonymous)
}

/// Allocates guest RAM with the given backing (not touched until the guest uses it).
pub fn create_guest_memory_with(
    mem_mib: u64,
    backing: MemoryBacking,
) -> Result<GuestMemory, MemoryError> {
    let ranges = ram_ranges(mem_mib << 20);
    let alloc = |source| MemoryError::Allocate {
        mib: mem_mib,
        source,
    };
    match backing {
        MemoryBacking::Anonymous => {
            let ranges: Vec<(GuestAddress, usize)> =
                ranges.into_iter().map(|(a, l)| (a, l as usize)).collect();
            GuestMemoryMmap::from_ranges(&ranges).map_err(alloc)
        }
        MemoryBacking::SharedMemfd => {
            let memfd_err = |what| {
                move |source| MemoryError::Memfd {
                    mib: mem_mib,
                    what,
                    source,
                }
            };
            let file = sealed_memfd(mem_mib << 20).map_err(memfd_err("memfd"))?;
            let mut offset = 0u64;
            let mut with_files = Vec::with_capacity(ranges.len());
            for (addr, len) in ranges {
                let f = file.try_clone().map_err(memfd_err("dup"))?;
                with_files.push((addr, len as usize, Some(FileOffset::new(f, offset))));
                offset += len;
            }
            GuestMemoryMmap::from_ranges_with_files(&with_files).map_err(alloc)
        }
    }
}

/// A close-on-exec memfd of `size` bytes whose size can no longer change.
fn sealed_memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"husk-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd we own, with a plain integer argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
        assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && (IOAPIC_ADDR as u64) < MMIO_GAP_END);
    }

    #[test]
    fn shared_memfd_backing_is_sealed_and_shared() {
        use std::os::fd::AsRawFd;
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let mem = create_guest_memory_with(64, MemoryBacking::SharedMemfd).unwrap();
        let region = mem.iter().next().unwrap();
        let fo = region.file_offset().expect("memfd backing has a file");
        assert_eq!(fo.start(), 0);
        assert_eq!(fo.file().metadata().unwrap().len(), 64 << 20);
        // SAFETY: F_GET_SEALS only reads the seal set of a valid fd.
        let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        assert!(fo.file().set_len(1 << 20).is_err(), "cannot shrink");
        // Writes through the mapping are visible through the file (MAP_SHARED).
        mem.write_obj(0xabcd_u32, GuestAddress(0x1000)).unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(fo.file(), &mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xabcd);
        let anon = create_guest_memory(64).unwrap();
        assert!(anon.iter().next().unwrap().file_offset().is_none());
    }
}
