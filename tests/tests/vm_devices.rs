//! End to end: the guest uses virtio-blk disks and a virtio-net interface on a tap (also one inside
//! another network namespace). The guest side is tests/images/guest-e2e.sh. Needs KVM, root and
//! /dev/net/tun: run through tests/testhost/run (make e2e).

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use husk_tests::{result_lines, vm_test_setup, Artifacts, VmOptions, VmProcess};

/// Boots the device test image with `scenario` and returns its RESULT lines.
fn run_scenario(a: &Artifacts, scenario: &str, extra_args: Vec<String>) -> Vec<String> {
    let mut vm = VmProcess::spawn(a, &VmOptions::scenario(a, scenario, extra_args)).unwrap();
    let lines = vm
        .console_until("HUSK-E2E-DONE", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\nstderr: {}", vm.stderr()));
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    result_lines(&lines)
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "`{cmd}` failed");
}

#[test]
fn guest_reads_and_writes_disks_and_read_only_is_enforced() {
    let a = vm_test_setup();
    let dir = tempfile::tempdir().unwrap();
    let (rw, ro) = (dir.path().join("rw.img"), dir.path().join("ro.img"));
    let rw_file = std::fs::File::create(&rw).unwrap();
    rw_file.set_len(8 << 20).unwrap();
    rw_file.write_all_at(b"host-wrote-this!", 0).unwrap();
    std::fs::File::create(&ro)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::File::open(&ro)
        .unwrap()
        .write_all_at(b"", 0)
        .unwrap();

    let results = run_scenario(
        &a,
        "blk",
        vec![
            "--disk".into(),
            format!("path={},id=data-disk", rw.display()),
            "--disk".into(),
            format!("path={},ro,id=ro-disk", ro.display()),
        ],
    );
    let expect = [
        "serial vda=data-disk vdb=ro-disk",
        "ro vda=0 vdb=1",
        "size vda=16384",
        "read host-wrote-this!",
        "write ok",
        "rowrite refused",
        "bigread ok",
    ];
    for e in expect {
        assert!(
            results.iter().any(|r| r == e),
            "missing {e:?} in {results:?}"
        );
    }
    let mut sector1 = [0u8; 16];
    std::fs::File::open(&rw)
        .unwrap()
        .read_exact_at(&mut sector1, 512)
        .unwrap();
    assert_eq!(&sector1, b"guest-wrote-this");
    let ro_bytes = std::fs::read(&ro).unwrap();
    assert!(
        ro_bytes.iter().all(|b| *b == 0),
        "the read-only image is unchanged"
    );
}

/// Removes the tap and namespace even when the test fails.
struct NetCleanup(&'static str);
impl Drop for NetCleanup {
    fn drop(&mut self) {
        let _ = Command::new("sh").arg("-c").arg(self.0).status();
    }
}

#[test]
fn guest_pings_the_host_over_a_tap() {
    let a = vm_test_setup();
    let _c = NetCleanup("ip link del hkt0 2>/dev/null");
    sh("ip tuntap add dev hkt0 mode tap && ip addr add 10.77.0.1/24 dev hkt0 && ip link set hkt0 up");
    let results = run_scenario(
        &a,
        "net 10.77.0.2 10.77.0.1",
        vec!["--net".into(), "tap=hkt0,mac=02:11:22:33:44:55".into()],
    );
    assert!(
        results.contains(&"mac 02:11:22:33:44:55".to_string()),
        "{results:?}"
    );
    assert!(results.contains(&"ping ok".to_string()), "{results:?}");
}

#[test]
fn tap_inside_a_pod_network_namespace() {
    let a = vm_test_setup();
    let _c = NetCleanup("ip netns del husk-e2e-pod 2>/dev/null");
    sh("ip netns add husk-e2e-pod && ip netns exec husk-e2e-pod sh -c \
        'ip link set lo up && ip tuntap add dev hkt1 mode tap && ip addr add 10.78.0.1/24 dev hkt1 && ip link set hkt1 up'");
    let results = run_scenario(
        &a,
        "net 10.78.0.2 10.78.0.1",
        vec![
            "--net".into(),
            "tap=hkt1,netns=/var/run/netns/husk-e2e-pod".into(),
        ],
    );
    assert!(results.contains(&"ping ok".to_string()), "{results:?}");
    // The VMM's own namespace never had the tap.
    let here = Command::new("ip")
        .args(["link", "show", "hkt1"])
        .output()
        .unwrap();
    assert!(
        !here.status.success(),
        "hkt1 leaked into the test host's namespace"
    );
}
