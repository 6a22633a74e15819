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

use vm_memory::{GuestAddress, GuestMemoryMmap};

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
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(a, l)| (a, l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: mem_mib,
        source,
    })
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
}
