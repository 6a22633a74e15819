//! End to end: husk-vmm boots the guest kernel with the agent as /init; the host reaches the agent over
//! the hybrid vsock socket; the guest shuts down cleanly and nothing is left behind. Needs a KVM that
//! boots stock guests: run through tests/testhost/run (make e2e). Without /dev/kvm these tests fail.

use std::process::Command;
use std::time::Duration;

use husk_tests::{processes_mentioning, vm_test_setup, GuestImage, VmOptions, VmProcess};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn agent_answers_over_vsock_and_guest_shuts_down_cleanly() {
    let a = vm_test_setup();
    let opts = VmOptions {
        vcpus: 2,
        mem_mib: 256,
        ..VmOptions::agent(&a)
    };
    let mut vm = VmProcess::spawn(&a, &opts).unwrap();
    let dir = vm.dir().to_path_buf();
    let rt = runtime();
    let client = rt
        .block_on(vm.connect_agent(Duration::from_secs(90)))
        .unwrap_or_else(|e| panic!("agent did not answer: {e}\nconsole:\n{}", vm.console()));
    let ping = rt.block_on(client.ping()).unwrap();
    assert_eq!(ping.api_version, husk_proto::API_VERSION);

    let info = rt.block_on(client.guest_info()).unwrap();
    assert!(
        info.kernel_release.ends_with("-husk"),
        "guest kernel release {:?} is not Husk's guest kernel",
        info.kernel_release
    );
    assert_eq!(info.online_cpus, 2, "the guest sees every vCPU (MP table)");
    let mib = info.mem_total_bytes >> 20;
    assert!(
        (200..=256).contains(&mib),
        "guest MemTotal {mib} MiB for a 256 MiB VM"
    );
    assert!(info.mem_available_bytes <= info.mem_total_bytes);
    assert!(info.uptime > Duration::ZERO);

    rt.block_on(client.shutdown()).unwrap();
    drop(client);
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "husk-vmm exit after a guest shutdown; stderr: {}",
        vm.stderr()
    );
    assert!(!vm.vsock_path().exists(), "the vsock socket was removed");
    let leftovers = processes_mentioning(dir.to_str().unwrap());
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
}

#[test]
fn sigterm_stops_the_vm_and_removes_its_socket() {
    let a = vm_test_setup();
    let mut vm = VmProcess::spawn(&a, &VmOptions::agent(&a)).unwrap();
    let rt = runtime();
    rt.block_on(vm.connect_agent(Duration::from_secs(90)))
        .unwrap_or_else(|e| panic!("agent did not answer: {e}\nconsole:\n{}", vm.console()));
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(!vm.vsock_path().exists());
}

#[test]
fn several_vcpus_boot_to_init_and_reboot_ends_the_vmm() {
    let a = vm_test_setup();
    let opts = VmOptions {
        vcpus: 4,
        image: GuestImage::Initrd(a.marker_initrd.clone()),
        console_to_pipe: true,
        ..VmOptions::agent(&a)
    };
    let mut vm = VmProcess::spawn(&a, &opts).unwrap();
    let (_, line) = vm
        .wait_console_line("HUSK-GUEST-INIT", Duration::from_secs(90))
        .unwrap();
    assert!(line.contains("-husk"), "{line}");
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
}

#[test]
fn bad_arguments_give_one_clear_line_and_status_2() {
    let a = vm_test_setup();
    let run = |args: &[&str]| {
        let out = Command::new(&a.vmm).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), err)
    };
    let kernel = a.kernel.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            "/nonexistent/vmlinux",
        ),
        (vec!["--kernel", kernel, "--mem-mib", "8"], "MiB"),
        (vec!["--kernel", kernel, "--vcpus", "0"], "vCPUs"),
        (vec!["--kernel", kernel, "--frobnicate"], "--frobnicate"),
        (
            vec!["--kernel", kernel, "--initrd", "/nonexistent/initrd"],
            "initrd",
        ),
        (
            vec!["--kernel", kernel, "--vsock-uds", "/nonexistent/dir/v.sock"],
            "/nonexistent/dir",
        ),
    ] {
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line, got {err:?}"
        );
        assert!(
            err.contains(expect),
            "{args:?}: {err:?} should mention {expect}"
        );
    }
}
