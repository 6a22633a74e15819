//! A VM: KVM, guest memory, devices, vCPUs and the device event loop, assembled from a `VmConfig`,
//! run until the guest (or a signal, or an error) ends it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, cpu, BootSpec};
use crate::config::{ConsoleOutput, VmConfig, BASE_CMDLINE};
use crate::control::{spawn_control_server, AttachedDevice, ControlCommand, DeviceHandle};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use crate::devices::serial::{SerialConsole, COM1_IRQ, COM1_LEN, COM1_PORT};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_LEN};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::exit::{ExitLatch, VmExit};
use crate::memory::{
    create_guest_memory_with, GuestMemory, MemoryBacking, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR,
    VIRTIO_MMIO_START,
};
use crate::supervisor::Supervisor;
use crate::vcpu::{Vcpu, VcpuGate, VcpuHandle};

/// virtio-mmio devices get GSIs from here up (below are the legacy ISA ones: serial on 4).
const VIRTIO_FIRST_IRQ: u32 = 5;
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// What the device event loop holds: a virtio device that is also an event subscriber.
trait LoopDevice: VirtioDevice + MutEventSubscriber + Send {}
impl<T: VirtioDevice + MutEventSubscriber + Send> LoopDevice for T {}

type Subscriber = Arc<Mutex<dyn LoopDevice>>;

/// How long VM start waits for the event loop to register every device.
const EVENT_LOOP_READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible?)")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM lacks a required capability: {0:?}")]
    KvmCapability(Cap),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("cannot open console file {path}: {source}")]
    Console {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("{what} device: {reason}")]
    Device { what: &'static str, reason: String },
    #[error("virtio-mmio transport: {0}")]
    Transport(String),
    #[error("control socket: {0}")]
    Control(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// A built VM, ready to run.
pub struct Vm {
    // Kept open for the VM's lifetime: the VM and vCPU fds hold references to it.
    _kvm: Kvm,
    _vm_fd: VmFd,
    _mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    subscribers: Vec<Subscriber>,
    devices: Vec<DeviceHandle>,
    exit: Arc<ExitLatch>,
    reset_evt: EventFd,
    vsock_uds: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    mem_mib: u64,
}

impl Vm {
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        config.validate()?;
        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::UserMemory,
            Cap::Pit2,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::KvmCapability(cap));
            }
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("set TSS address"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("set identity map address"))?;
        vm_fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;

        // A vhost-user daemon maps guest RAM itself: it must be a shareable memfd then.
        let backing = if config.fs.is_empty() {
            MemoryBacking::Anonymous
        } else {
            MemoryBacking::SharedMemfd
        };
        let mem = create_guest_memory_with(config.mem_mib, backing)?;
        register_memory(&vm_fd, &mem)?;

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let exit = Arc::new(ExitLatch::new().map_err(io_err("create exit eventfd"))?);
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create reset eventfd"))?;

        let console: Box<dyn Write + Send> = match &config.console {
            ConsoleOutput::Stdout => Box::new(std::io::stdout()),
            ConsoleOutput::Discard => Box::new(std::io::sink()),
            ConsoleOutput::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmError::Console {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create serial irqfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("register serial irqfd"))?;
        pio.insert(
            Arc::new(Mutex::new(SerialConsole::new(serial_irq, console))),
            COM1_PORT,
            COM1_LEN,
        )?;
        let reset = reset_evt
            .try_clone()
            .map_err(io_err("clone reset eventfd"))?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(reset))),
            I8042_PORT,
            I8042_LEN,
        )?;

        let mut cmdline = boot::new_cmdline();
        cmdline.insert_str(BASE_CMDLINE).map_err(VmError::Cmdline)?;

        let mut devices = Vec::new();
        let mut virtio = VirtioSlots {
            vm_fd: &vm_fd,
            mem: &mem,
            mmio: &mut mmio,
            cmdline: &mut cmdline,
            subscribers: Vec::new(),
        };
        for disk in &config.disks {
            let dev = Block::new(disk.clone()).map_err(|e| VmError::Device {
                what: "virtio-blk",
                reason: e.to_string(),
            })?;
            devices.push(virtio.attach(dev, AttachedDevice::Block)?);
        }
        for net in &config.nets {
            let dev = Net::new(net.clone()).map_err(|e| VmError::Device {
                what: "virtio-net",
                reason: e.to_string(),
            })?;
            devices.push(virtio.attach(dev, AttachedDevice::Net)?);
        }
        for fs in &config.fs {
            let dev = Fs::new(fs.clone()).map_err(|e| VmError::Device {
                what: "virtio-fs",
                reason: e.to_string(),
            })?;
            devices.push(virtio.attach(dev, AttachedDevice::Fs)?);
        }
        if let Some(vs) = &config.vsock {
            let dev =
                Vsock::new(vs.guest_cid, vs.uds_path.clone()).map_err(|e| VmError::Device {
                    what: "virtio-vsock",
                    reason: e.to_string(),
                })?;
            devices.push(virtio.attach(dev, AttachedDevice::Vsock)?);
        }
        let subscribers = virtio.subscribers;

        if let Some(extra) = &config.cmdline_extra {
            cmdline.insert_str(extra).map_err(VmError::Cmdline)?;
        }

        let entry = boot::load(
            &mem,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                num_cpus: config.vcpus,
            },
        )?;
        cpu::setup_memory(&mem)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(id as u64)
                .map_err(kvm_err("create vCPU"))?;
            cpu::configure_vcpu(&fd, id, &cpu::vcpu_cpuid(&supported, id, config.vcpus))?;
            if id == 0 {
                cpu::configure_boot_vcpu(&fd, entry.entry_addr.raw_value())?;
            }
            vcpus.push(Vcpu {
                id,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
            });
        }

        Ok(Vm {
            _kvm: kvm,
            _vm_fd: vm_fd,
            _mem: mem,
            vcpus,
            subscribers,
            devices,
            exit,
            reset_evt,
            vsock_uds: config.vsock.as_ref().map(|v| v.uds_path.clone()),
            control_socket: config.control_socket.clone(),
            mem_mib: config.mem_mib,
        })
    }

    /// Runs the guest until it ends, then stops every thread and removes the VM's sockets.
    pub fn run(mut self) -> VmExit {
        let stop = Arc::new(AtomicBool::new(false));
        let result = self.run_inner(&stop);
        for p in self.vsock_uds.iter().chain(&self.control_socket) {
            let _ = std::fs::remove_file(p);
        }
        result
    }

    fn run_inner(&mut self, stop: &Arc<AtomicBool>) -> VmExit {
        let signal_evt = match install_termination_signals() {
            Ok(e) => e,
            Err(e) => return VmExit::Error(format!("installing signal handlers: {e}")),
        };
        let events = match start_event_loop(std::mem::take(&mut self.subscribers), stop.clone()) {
            Ok(t) => t,
            Err(e) => return VmExit::Error(format!("starting the device event loop: {e}")),
        };
        let control = match self.start_control_server(stop) {
            Ok(c) => c,
            Err(e) => return VmExit::Error(e.to_string()),
        };
        let started = Instant::now();
        let gate = Arc::new(VcpuGate::default());
        let mut handles: Vec<VcpuHandle> = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            match vcpu.start(self.exit.clone(), stop.clone(), gate.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.exit
                        .set(VmExit::Error(format!("starting a vCPU thread: {e}")));
                    break;
                }
            }
        }

        let (control_rx, control_thread) = match control {
            Some((rx, notify, thread)) => (Some((rx, notify)), Some(thread)),
            None => (None, None),
        };
        let reason = Supervisor {
            exit: &self.exit,
            reset: &self.reset_evt,
            signal: signal_evt,
            signal_number: || LAST_SIGNAL.load(Ordering::Relaxed),
            control: control_rx,
            vcpus: &handles,
            gate: &gate,
            devices: &self.devices,
            mem_mib: self.mem_mib,
            vsock_uds: self.vsock_uds.clone(),
            started,
        }
        .run();
        stop.store(true, Ordering::Release);
        gate.wake_all();
        for h in handles {
            h.stop_and_join();
        }
        for (what, t) in [
            ("device event loop", Some(events)),
            ("control", control_thread),
        ] {
            if t.is_some_and(|t| t.join().is_err()) {
                tracing::error!("the {what} thread panicked");
            }
        }
        reason
    }

    /// The control socket, if configured: its request channel, the eventfd that announces requests,
    /// and the listener thread.
    #[allow(clippy::type_complexity)]
    fn start_control_server(
        &self,
        stop: &Arc<AtomicBool>,
    ) -> Result<Option<(mpsc::Receiver<ControlCommand>, EventFd, JoinHandle<()>)>, VmError> {
        let Some(path) = &self.control_socket else {
            return Ok(None);
        };
        let (tx, rx) = mpsc::channel();
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create control eventfd"))?;
        let notify_server = notify
            .try_clone()
            .map_err(io_err("clone control eventfd"))?;
        let thread = spawn_control_server(path, tx, notify_server, stop.clone())
            .map_err(|e| VmError::Control(e.to_string()))?;
        Ok(Some((rx, notify, thread)))
    }
}

fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::Kvm {
                what: "guest memory region has no host mapping",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the Vm keeps alive for as long as
        // the VM fd exists; the slot and guest range do not overlap any other slot.
        unsafe { vm_fd.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
    }
    Ok(())
}

/// Hands out virtio-mmio slots: each device gets a 4 KiB window, a GSI, queue-notify ioeventfds, an
/// irqfd, a `virtio_mmio.device=` entry on the kernel command line, and a place in the event loop.
struct VirtioSlots<'a> {
    vm_fd: &'a VmFd,
    mem: &'a GuestMemory,
    mmio: &'a mut Bus,
    cmdline: &'a mut linux_loader::cmdline::Cmdline,
    subscribers: Vec<Subscriber>,
}

impl VirtioSlots<'_> {
    /// Attaches `device` at the next free slot; `kind` wraps it for the control socket's stats.
    fn attach<D>(
        &mut self,
        device: D,
        kind: fn(Arc<Mutex<D>>) -> AttachedDevice,
    ) -> Result<DeviceHandle, VmError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let slot = self.subscribers.len() as u64;
        let base = VIRTIO_MMIO_START + slot * MMIO_LEN;
        let irq = VIRTIO_FIRST_IRQ + slot as u32;
        let device = Arc::new(Mutex::new(device));
        let transport = MmioTransport::new(self.mem.clone(), device.clone())
            .map_err(|e| VmError::Transport(e.to_string()))?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            self.vm_fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + VIRTIO_MMIO_QUEUE_NOTIFY),
                    i as u32,
                )
                .map_err(kvm_err("register virtio queue ioeventfd"))?;
        }
        self.vm_fd
            .register_irqfd(transport.interrupt_evt(), irq)
            .map_err(kvm_err("register virtio irqfd"))?;
        let transport: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(transport));
        self.mmio.insert(transport, base, MMIO_LEN)?;
        self.cmdline
            .add_virtio_mmio_device(MMIO_LEN, GuestAddress(base), irq, None)
            .map_err(VmError::Cmdline)?;
        self.subscribers.push(device.clone());
        Ok(DeviceHandle {
            slot,
            device: kind(device),
        })
    }
}

/// The device event loop: virtio queue notifications and backend sockets, on one thread. Returns
/// once every device registered its events; a device that could not would never hear from its
/// queues, so that is an error and the VM does not start.
fn start_event_loop(
    subscribers: Vec<Subscriber>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, String> {
    let (ready_tx, ready) = mpsc::channel::<Result<(), String>>();
    let thread = std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            let mut em = match EventManager::<Subscriber>::new() {
                Ok(em) => em,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot create the epoll set: {e:?}")));
                    return;
                }
            };
            let mut errors = Vec::new();
            for (slot, s) in subscribers.into_iter().enumerate() {
                em.add_subscriber(s.clone());
                let dev = s.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = dev.event_loop_error() {
                    errors.push(format!(
                        "virtio device type {} in slot {slot}: {e}",
                        dev.device_type()
                    ));
                }
            }
            if !errors.is_empty() {
                let _ = ready_tx.send(Err(errors.join("; ")));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = em.run_with_timeout(50) {
                    tracing::error!("device event loop: {e:?}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
        .map_err(|e| format!("cannot start its thread: {e}"))?;
    match ready.recv_timeout(EVENT_LOOP_READY_TIMEOUT) {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "devices not registered within {EVENT_LOOP_READY_TIMEOUT:?}"
        )),
    }
}

static SIGNAL_EVT: OnceLock<EventFd> = OnceLock::new();
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_termination_signal(
    num: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    LAST_SIGNAL.store(num, Ordering::Relaxed);
    if let Some(evt) = SIGNAL_EVT.get() {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid 8-byte value on our stack and
        // the eventfd lives in a static that is never dropped.
        unsafe { libc::write(evt.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// SIGTERM and SIGINT stop the VM (a hard stop: the guest is not asked). Returns an eventfd that
/// becomes readable when one arrives.
fn install_termination_signals() -> std::io::Result<EventFd> {
    if SIGNAL_EVT.get().is_none() {
        let _ = SIGNAL_EVT.set(EventFd::new(libc::EFD_NONBLOCK)?);
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_termination_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    SIGNAL_EVT
        .get()
        .ok_or_else(|| std::io::Error::other("signal eventfd missing"))?
        .try_clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> Subscriber {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(1 << 20).unwrap();
        let dev = Block::new(crate::devices::virtio::block::BlockConfig {
            path: img.path().to_path_buf(),
            read_only: true,
            id: None,
        })
        .unwrap();
        Arc::new(Mutex::new(dev))
    }

    #[test]
    fn event_loop_starts_only_when_every_device_registered() {
        let stop = Arc::new(AtomicBool::new(false));
        let t = start_event_loop(vec![block(), block()], stop.clone()).unwrap();
        stop.store(true, Ordering::Release);
        t.join().unwrap();

        // The same device twice: its second registration of the same eventfds fails (EEXIST),
        // as any failure to register would, and the VM must not start with a deaf device.
        let dev = block();
        let stop = Arc::new(AtomicBool::new(false));
        let e = start_event_loop(vec![dev.clone(), dev], stop).unwrap_err();
        assert!(e.contains("virtio device type 2 in slot 1"), "{e}");
        // The first failure is the one reported.
        assert!(e.contains("cannot register the control eventfd"), "{e}");
    }
}
