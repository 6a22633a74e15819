//! End to end: the VMM's control socket on a running VM (state, pause/resume, stats, graceful and hard
//! stop). Needs KVM: run through tests/testhost/run (make e2e).

use std::time::{Duration, Instant};

use husk_tests::{vm_test_setup, VmOptions, VmProcess};

fn boot() -> (
    VmProcess,
    husk_proto::client::AgentClient,
    tokio::runtime::Runtime,
) {
    let a = vm_test_setup();
    let opts = VmOptions {
        vcpus: 2,
        control_socket: true,
        ..VmOptions::agent(&a)
    };
    let mut vm = VmProcess::spawn(&a, &opts).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(vm.connect_agent(Duration::from_secs(90)))
        .unwrap_or_else(|e| panic!("agent did not answer: {e}\nconsole:\n{}", vm.console()));
    (vm, client, rt)
}

#[test]
fn state_pause_resume_stats_and_graceful_stop() {
    let (mut vm, client, rt) = boot();
    let s = vm.control(r#"{"op":"state"}"#).unwrap();
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(s["state"], "running");
    assert_eq!(s["vcpus"], 2);
    assert_eq!(s["mem_mib"], 128);

    let early = vm.control(r#"{"op":"vcpus"}"#).unwrap();
    assert_eq!(
        early["ok"], false,
        "registers only of parked vCPUs: {early}"
    );

    let p = vm.control(r#"{"op":"pause"}"#).unwrap();
    assert_eq!(p["state"], "paused", "{p}");
    assert_eq!(vm.control(r#"{"op":"state"}"#).unwrap()["state"], "paused");
    // Each parked vCPU left its registers: an idle Linux guest in 64-bit mode, inside a function
    // of its kernel (the idle loop, or an interrupt handler that woke it).
    let syms = husk_tests::KernelSymbols::load(&vm_test_setup().kernel).unwrap();
    let v = vm.control(r#"{"op":"vcpus"}"#).unwrap();
    let vcpus = v["vcpus"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(vcpus.len(), 2, "{v}");
    for (i, c) in vcpus.iter().enumerate() {
        let reg = |name: &str| {
            let s = c[name].as_str().unwrap_or_else(|| panic!("{name} in {v}"));
            u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
        };
        assert_eq!(c["id"], i, "{v}");
        assert!(c.get("error").is_none(), "{v}");
        assert!(
            reg("rip") >= 0xffff_ffff_8000_0000,
            "rip outside kernel text: {v}"
        );
        let f = syms.name(reg("rip"));
        assert!(
            !f.starts_with('?') && !f.contains("past its end"),
            "{f}: {v}"
        );
        eprintln!("vcpu{i} paused at {f} ({})", c["mp_state"]);
        assert_ne!(reg("efer") & (1 << 10), 0, "EFER.LMA: {v}");
        assert_ne!(reg("cr3"), 0, "{v}");
        // KVM's counters of the vCPU (the test host's kernel has KVM_GET_STATS_FD).
        assert!(c["kvm_stats"]["exits"].as_u64().unwrap_or(0) > 0, "{v}");
    }
    let r = vm.control(r#"{"op":"resume"}"#).unwrap();
    assert_eq!(r["state"], "running", "{r}");
    rt.block_on(client.ping())
        .expect("the guest runs again after resume");

    let st = vm.control(r#"{"op":"stats"}"#).unwrap();
    let devices = st["devices"].as_array().expect("a device list");
    // The agent boots from the read-only root disk (slot 0): read on demand, never written.
    let root = &devices[0];
    assert_eq!(root["type"], "block", "{st}");
    assert!(root["read_bytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(
        (root["writes"].as_u64(), root["failed"].as_u64()),
        (Some(0), Some(0)),
        "{st}"
    );
    let vsock = devices
        .iter()
        .find(|d| d["type"] == "vsock")
        .unwrap_or_else(|| panic!("no vsock device: {st}"));
    assert_eq!(vsock["active"], true);
    for d in devices {
        assert_eq!(
            d["needs_reset"], false,
            "a healthy guest broke no ring: {st}"
        );
    }
    assert!(
        vsock["connections"].as_u64().unwrap() >= 1,
        "our agent connection: {st}"
    );

    let bad = vm.control(r#"{"op":"reboot"}"#).unwrap();
    assert_eq!(bad["ok"], false);

    let t = Instant::now();
    let g = vm
        .control(r#"{"op":"stop","mode":"graceful","timeout_ms":60000}"#)
        .unwrap();
    assert_eq!(g["stopping"], "graceful", "{g}");
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    assert!(
        vm.console()
            .contains("shutdown requested on the control port"),
        "the guest was asked, not killed; console:\n{}",
        vm.console()
    );
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(
        !vm.dir().join("control.sock").exists(),
        "the control socket was removed"
    );
}

#[test]
fn hard_stop_ends_the_vm_at_once() {
    let (mut vm, _client, _rt) = boot();
    let h = vm.control(r#"{"op":"stop","mode":"hard"}"#).unwrap();
    assert_eq!(h["stopping"], "hard", "{h}");
    let status = vm.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    assert!(!vm.vsock_path().exists());
}
