//! Direct Linux boot: load the kernel (ELF vmlinux or bzImage) and the initrd into guest memory,
//! write the command line, the zero page with its e820 map, and the MP table. The vCPU register
//! state for the 64-bit entry lives in [`cpu`].

pub mod cpu;
pub mod mptable;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{
    GuestMemory, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_END, HIGH_MEMORY_START, MMIO_GAP_START,
    MPTABLE_START, ZERO_PAGE_START,
};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// bzImage's 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel image {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load kernel image {path}: {source}")]
    KernelLoad {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel image {path} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat { path: PathBuf },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig { path: PathBuf, size: u64 },
    #[error("writing the initrd into guest memory: {0}")]
    InitrdWrite(vm_memory::GuestMemoryError),
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("writing the kernel command line: {0}")]
    CmdlineWrite(linux_loader::loader::Error),
    #[error("writing the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// Where the guest starts executing, in 64-bit mode with paging on.
#[derive(Debug, Clone, Copy)]
pub struct EntryPoint {
    pub entry_addr: GuestAddress,
}

/// Everything `load` needs to know about the guest.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a Cmdline,
    pub num_cpus: u8,
}

/// Loads the kernel, initrd, command line, zero page and MP table. Returns the 64-bit entry point.
pub fn load(mem: &GuestMemory, spec: &BootSpec<'_>) -> Result<EntryPoint, BootError> {
    let path = spec.kernel.to_path_buf();
    let mut kernel = File::open(spec.kernel).map_err(|source| BootError::KernelOpen {
        path: path.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    kernel
        .read_exact(&mut magic)
        .and_then(|_| kernel.seek(SeekFrom::Start(0)))
        .map_err(|source| BootError::KernelOpen {
            path: path.clone(),
            source,
        })?;
    let load_err = |source| BootError::KernelLoad {
        path: path.clone(),
        source,
    };
    let mut params = boot_params::default();
    let (entry_addr, kernel_end) = if magic == *b"\x7fELF" {
        let r = Elf::load(
            mem,
            None,
            &mut kernel,
            Some(GuestAddress(HIGH_MEMORY_START)),
        )
        .map_err(load_err)?;
        let entry = elf_entry(&mut kernel).map_err(|source| BootError::KernelOpen {
            path: path.clone(),
            source,
        })?;
        (GuestAddress(entry), r.kernel_end)
    } else {
        let r = BzImage::load(
            mem,
            None,
            &mut kernel,
            Some(GuestAddress(HIGH_MEMORY_START)),
        )
        .map_err(|e| match e {
            linux_loader::loader::Error::Bzimage(_) => {
                BootError::KernelFormat { path: path.clone() }
            }
            other => load_err(other),
        })?;
        if let Some(hdr) = r.setup_header {
            params.hdr = hdr;
        }
        (
            r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
            r.kernel_end,
        )
    };

    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;

    if let Some(initrd) = spec.initrd {
        let (addr, size) = load_initrd(mem, initrd, kernel_end)?;
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let cmdline = spec.cmdline.as_cstring().map_err(BootError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), spec.cmdline)
        .map_err(BootError::CmdlineWrite)?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.as_bytes().len() as u32;

    // Base memory below the MP table, the MP table itself reserved, then every RAM region from 1 MiB.
    let mut e820 = vec![
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, EBDA_END - MPTABLE_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIGH_MEMORY_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            e820.push((start, end - start, E820_RAM));
        }
    }
    for (i, (addr, size, kind)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
        params.e820_entries = i as u8 + 1;
    }

    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)?;
    mptable::setup(mem, spec.num_cpus)?;
    Ok(EntryPoint { entry_addr })
}

/// The ELF header's entry point: for a vmlinux, the 64-bit `startup_64`.
fn elf_entry(f: &mut File) -> std::io::Result<u64> {
    let mut e = [0u8; 8];
    f.seek(SeekFrom::Start(0x18))?;
    f.read_exact(&mut e)?;
    Ok(u64::from_le_bytes(e))
}

/// Places the initrd page-aligned at the top of low RAM (below 4 GiB, as the boot protocol wants).
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let low_end = (mem.last_addr().raw_value() + 1).min(MMIO_GAP_START);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel_end && size > 0 && size <= u32::MAX as u64)
        .ok_or_else(|| BootError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(BootError::InitrdWrite)?;
    Ok((GuestAddress(addr), size))
}

/// The largest command line the layout has room for.
pub fn new_cmdline() -> Cmdline {
    // Only fails for a zero capacity.
    Cmdline::new(CMDLINE_MAX_SIZE).expect("non-zero command line capacity")
}
