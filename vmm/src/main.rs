//! `husk-vmm`: boots one microVM from the command line and exits when the guest does.
//!
//! Exit status: 0 guest rebooted or powered off; 1 VMM error; 2 bad arguments; 3 guest crash;
//! 128+N stopped by signal N.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use husk_vmm::{ConsoleOutput, Vm, VmConfig, VsockConfig};

#[derive(Parser, Debug)]
#[command(
    name = "husk-vmm",
    version,
    about = "Husk microVM monitor: boots one Linux guest on KVM"
)]
struct Cli {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (cpio), e.g. the Husk guest image with the agent as /init.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Read-only root image (erofs or ext4) with the agent as /init, instead of an initrd: it
    /// becomes /dev/vda, before any --disk (docs/guest-image.md).
    #[arg(long, conflicts_with = "initrd")]
    rootfs: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Extra kernel command line, appended to the built-in one (may start with `--`: init arguments).
    #[arg(long, allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Where the guest serial console goes: a file path, `stdout`, or `none`.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Host side of the virtio-vsock device: a Unix socket (Firecracker-style `CONNECT <port>`).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// A virtio-blk disk: `path=FILE[,ro][,id=SERIAL]` (repeatable; /dev/vda, /dev/vdb, ...).
    #[arg(long = "disk", value_parser = husk_vmm::config::parse_disk)]
    disks: Vec<husk_vmm::config::BlockConfig>,
    /// A virtio-net interface on a tap: `tap=NAME[,mac=MAC][,netns=PATH]` (repeatable; eth0, ...).
    #[arg(long = "net", value_parser = husk_vmm::config::parse_net)]
    nets: Vec<husk_vmm::config::NetConfig>,
    /// A virtio-fs share served by a vhost-user-fs daemon (virtiofsd): `socket=PATH,tag=TAG`
    /// (repeatable; the guest mounts it with `mount -t virtiofs TAG DIR`).
    #[arg(long = "fs", value_parser = husk_vmm::config::parse_fs)]
    fs: Vec<husk_vmm::config::FsConfig>,
    /// Serve the control socket here (state, pause/resume, stats, stop: docs/control-socket.md).
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("husk-vmm: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let (mut disks, mut cmdline) = (cli.disks, cli.cmdline);
    if let Some(image) = cli.rootfs {
        cmdline = husk_vmm::config::use_root_image(image, &mut disks, cmdline);
    }
    let config = VmConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        vcpus: cli.vcpus,
        mem_mib: cli.mem_mib,
        cmdline_extra: cmdline,
        console: match cli.console.as_str() {
            "stdout" => ConsoleOutput::Stdout,
            "none" => ConsoleOutput::Discard,
            path => ConsoleOutput::File(path.into()),
        },
        vsock: cli.vsock_uds.map(|uds_path| VsockConfig {
            guest_cid: cli.vsock_cid,
            uds_path,
        }),
        disks,
        nets: cli.nets,
        fs: cli.fs,
        control_socket: cli.control_socket,
    };
    if let Err(e) = config.validate() {
        eprintln!("husk-vmm: {e}");
        return ExitCode::from(2);
    }
    raise_fd_limit();
    let vm = match Vm::new(&config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            return ExitCode::from(1);
        }
    };
    let exit = vm.run();
    tracing::info!("VM ended: {exit}");
    match &exit {
        husk_vmm::VmExit::Error(e) => eprintln!("husk-vmm: {e}"),
        husk_vmm::VmExit::GuestCrash | husk_vmm::VmExit::TripleFault { .. } => {
            eprintln!("husk-vmm: {exit}")
        }
        _ => {}
    }
    ExitCode::from(exit.exit_code().clamp(0, 255) as u8)
}

/// Each vsock connection holds a host socket; allow as many as the hard limit permits.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("cannot raise the open-file limit");
            }
        }
    }
}
