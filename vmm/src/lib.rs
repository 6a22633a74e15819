//! husk-vmm: a small KVM virtual machine monitor that runs one pod's microVM.
//!
//! - [`boot`]: direct 64-bit Linux boot (kernel, initrd, zero page, MP table, vCPU registers)
//! - [`memory`]: the guest physical address map
//! - [`devices`]: buses, serial console, i8042 reset, virtio-mmio transport and devices
//! - [`vcpu`]: vCPU threads; [`vm`]: assembling and running a VM; [`exit`]: why it ended
//! - [`control`]: the control socket; [`supervisor`]: the main thread while the guest runs

pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
pub mod exit;
pub mod kvm_stats;
pub mod memory;
pub mod supervisor;
pub mod vcpu;
pub mod vm;

pub use config::{ConsoleOutput, VmConfig, VsockConfig};
pub use exit::VmExit;
pub use vm::{Vm, VmError};
