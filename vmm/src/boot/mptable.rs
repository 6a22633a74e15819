//! The Intel MultiProcessor table: how a guest without ACPI learns its CPUs, its IOAPIC and how ISA
//! interrupts are routed. Written once at boot into the last KiB of base memory.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestMemory, EBDA_END, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};

/// Interrupt pins of the in-kernel IOAPIC, all routed 1:1 from the ISA bus.
pub const IOAPIC_PINS: u8 = 24;
/// Enough for the table to fit in the 1 KiB below the EBDA end (20 bytes per CPU).
pub const MAX_VCPUS: u8 = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs requested; the MP table supports 1 to {MAX_VCPUS}")]
    TooManyCpus(u8),
    #[error("writing the MP table to guest memory at {addr:#x}: {source}")]
    Write {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer and configuration table for `num_cpus` CPUs, laid out at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus; // APIC ids 0..num_cpus are the CPUs
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&[
            0,
            cpu,
            APIC_VERSION,
            CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type, irq type, flags (conforming polarity and trigger), bus 0, bus irq, ioapic, pin
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // The PIC's output goes to LINT0 of the boot CPU; NMIs to LINT1 of every CPU.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4, checksum, features
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` CPUs into guest memory.
pub fn setup(mem: &GuestMemory, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    debug_assert!(MPTABLE_START + bytes.len() as u64 <= EBDA_END);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|source| MpTableError::Write {
            addr: MPTABLE_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_layout() {
        for cpus in [1, 2, MAX_VCPUS] {
            let t = build(cpus, MPTABLE_START).unwrap();
            assert!(
                MPTABLE_START + t.len() as u64 <= EBDA_END,
                "{cpus} cpus do not fit"
            );
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(len, t.len() - 16);
            assert_eq!(sum(&t[16..]), 0);
            let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
            assert_eq!(count as usize, cpus as usize + 2 + IOAPIC_PINS as usize + 2);
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(MAX_VCPUS + 1, MPTABLE_START).is_err());
    }
}
