//! vCPU state for the Linux 64-bit boot protocol: CPUID, MSRs, the local APIC, and for the boot CPU the
//! long-mode registers (identity-mapped first GiB, flat GDT, `rsi` pointing at the zero page).
//! Secondary CPUs are left for the guest to start with INIT/SIPI through the in-kernel LAPIC.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{
    GuestMemory, BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("vCPU {cpu}: {what}: {source}")]
    Kvm {
        cpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing {what} to guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("building the MSR list: {0}")]
    Msrs(vmm_sys_util::fam::Error),
    #[error("vCPU {cpu}: KVM accepted only {set} of {wanted} MSRs")]
    MsrsPartial { cpu: u8, set: usize, wanted: usize },
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_HTT: u32 = 1 << 28;

/// Writes what every vCPU shares: the GDT, an empty IDT and the identity page tables of the first GiB.
pub fn setup_memory(mem: &GuestMemory) -> Result<(), CpuError> {
    let write = |what, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| CpuError::Memory { what, source })
    };
    for (i, entry) in GDT.iter().enumerate() {
        write("GDT", GDT_START + 8 * i as u64, entry.raw())?;
    }
    write("IDT", IDT_START, 0)?;
    write("PML4", PML4_START, PDPTE_START | 0x03)?;
    write("PDPTE", PDPTE_START, PDE_START | 0x03)?;
    for i in 0..512u64 {
        // 2 MiB pages: present, writable, page size.
        write("PDE", PDE_START + 8 * i, (i << 21) | 0x83)?;
    }
    Ok(())
}

/// A flat-model GDT descriptor: access/flags, base, limit (in 4 KiB units when G is set).
#[derive(Clone, Copy)]
struct GdtEntry {
    flags: u16,
    base: u32,
    limit: u32,
}

impl GdtEntry {
    const fn new(flags: u16, base: u32, limit: u32) -> Self {
        Self { flags, base, limit }
    }

    fn raw(self) -> u64 {
        let (f, b, l) = (self.flags as u64, self.base as u64, self.limit as u64);
        ((b & 0xff00_0000) << 32)
            | ((f & 0xf0ff) << 40)
            | ((l & 0x000f_0000) << 32)
            | ((b & 0x00ff_ffff) << 16)
            | (l & 0xffff)
    }

    fn segment(self, index: u16) -> kvm_segment {
        let bit = |n: u16| ((self.flags >> n) & 1) as u8;
        let g = bit(15);
        kvm_segment {
            base: self.base as u64,
            limit: if g == 1 {
                (self.limit << 12) | 0xfff
            } else {
                self.limit
            },
            selector: index * 8,
            type_: (self.flags & 0xf) as u8,
            present: bit(7),
            dpl: ((self.flags >> 5) & 3) as u8,
            db: bit(14),
            s: bit(4),
            l: bit(13),
            g,
            avl: bit(12),
            padding: 0,
            unusable: 1 - bit(7),
        }
    }
}

const GDT: [GdtEntry; 4] = [
    GdtEntry::new(0, 0, 0),            // null
    GdtEntry::new(0xa09b, 0, 0xfffff), // code: 64-bit, present, execute/read
    GdtEntry::new(0xc093, 0, 0xfffff), // data: present, read/write
    GdtEntry::new(0x808b, 0, 0xfffff), // TSS: present, 64-bit busy TSS
];

/// Adapts KVM's supported CPUID to this vCPU: its APIC id, the CPU count, the hypervisor bit.
pub fn vcpu_cpuid(supported: &CpuId, cpu: u8, num_cpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0xffff) | ((num_cpus as u32) << 16) | ((cpu as u32) << 24);
                e.ecx |= CPUID_HYPERVISOR;
                if num_cpus > 1 {
                    e.edx |= CPUID_HTT;
                }
            }
            // Extended topology: the x2APIC id of this CPU.
            0xb | 0x1f => e.edx = cpu as u32,
            // AMD extended APIC id.
            0x8000_001e => e.eax = cpu as u32,
            _ => {}
        }
    }
    cpuid
}

/// CPUID, MSRs and LINT0/LINT1 wiring: needed on every vCPU.
pub fn configure_vcpu(vcpu: &VcpuFd, cpu: u8, cpuid: &CpuId) -> Result<(), CpuError> {
    let kvm = |what| move |source| CpuError::Kvm { cpu, what, source };
    vcpu.set_cpuid2(cpuid).map_err(kvm("set CPUID"))?;

    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(CpuError::Msrs)?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
    if set != entries.len() {
        return Err(CpuError::MsrsPartial {
            cpu,
            set,
            wanted: entries.len(),
        });
    }

    let mut lapic: kvm_lapic_state = vcpu.get_lapic().map_err(kvm("get LAPIC"))?;
    set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("set LAPIC"))?;
    Ok(())
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
    let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        lapic.regs[reg + i] = b as _;
    }
}

/// Puts the boot CPU in 64-bit mode at `entry`, as the Linux 64-bit boot protocol requires.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), CpuError> {
    let kvm = |what| {
        move |source| CpuError::Kvm {
            cpu: 0,
            what,
            source,
        }
    };
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU"))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    let data = GDT[2].segment(2);
    sregs.cs = GDT[1].segment(1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = GDT[3].segment(3);
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("set regs"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_encoding_matches_the_flat_model() {
        assert_eq!(GDT[0].raw(), 0);
        assert_eq!(GDT[1].raw(), 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2].raw(), 0x00cf_9300_0000_ffff);
        let cs = GDT[1].segment(1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.g, cs.present),
            (8, 1, 0, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let tr = GDT[3].segment(3);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
    }

    #[test]
    fn cpuid_carries_apic_id_and_cpu_count() {
        let leaf1 = kvm_cpuid_entry2 {
            function: 1,
            ebx: 0x0000_0800,
            ..Default::default()
        };
        let topo = kvm_cpuid_entry2 {
            function: 0xb,
            ..Default::default()
        };
        let supported = CpuId::from_entries(&[leaf1, topo]).unwrap();
        let c = vcpu_cpuid(&supported, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0304_0800);
        assert_ne!(e[0].ecx & CPUID_HYPERVISOR, 0);
        assert_ne!(e[0].edx & CPUID_HTT, 0);
        assert_eq!(e[1].edx, 3);
    }

    #[test]
    fn lvt_mode_bits() {
        let mut l = kvm_lapic_state::default();
        l.regs[APIC_LVT0 + 1] = 0x07; // mode bits already set to something
        l.regs[APIC_LVT0 + 2] = 0x01; // mask bit (16) kept
        set_lvt_mode(&mut l, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(l.regs[APIC_LVT0 + 1] as u8, 0x04);
        assert_eq!(l.regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
