//! End to end: a virtio-fs share served by virtiofsd (vhost-user) through husk-vmm's vhost-user-fs
//! frontend. The guest mounts it by tag, sees files the host wrote before and after boot, writes
//! back, cannot get out of the share (`..`, symlinks, hard links, /proc/self), and a read-only share
//! refuses writes on the host side. The guest side is the `fs`/`fsdeath` scenarios of
//! tests/images/guest-e2e.sh. Needs KVM, root and build/testhost/virtiofsd (make testhost): run
//! through tests/testhost/run (make e2e).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use husk_tests::virtiofsd::Virtiofsd;
use husk_tests::{result_lines, vm_test_setup, Artifacts, VmOptions, VmProcess};

fn spawn_vm(a: &Artifacts, scenario: &str, extra_args: Vec<String>) -> VmProcess {
    VmProcess::spawn(a, &VmOptions::scenario(a, scenario, extra_args)).unwrap()
}

#[test]
fn guest_uses_a_shared_directory_and_cannot_escape_it() {
    let a = vm_test_setup();
    let tmp = tempfile::Builder::new()
        .prefix("husk-fs-")
        .tempdir_in("/tmp")
        .unwrap();
    let root = tmp.path();
    let (share, ro_share, outside) = (root.join("share"), root.join("ro"), root.join("outside"));
    for d in [&share, &ro_share, &outside, &share.join("gone")] {
        std::fs::create_dir_all(d).unwrap();
    }
    let secret = format!("HUSK-HOST-SECRET-{}", std::process::id());
    std::fs::write(outside.join("secret.txt"), &secret).unwrap();
    std::fs::write(root.join("secret.txt"), &secret).unwrap();
    std::fs::write(share.join("before.txt"), "written-before-boot").unwrap();
    std::fs::write(ro_share.join("keep.txt"), "read-only-content").unwrap();
    let link = |target: &str, name: &str| {
        std::os::unix::fs::symlink(target, share.join(name)).unwrap();
    };
    link(
        &outside.join("secret.txt").display().to_string(),
        "abs-link",
    );
    link("../outside/secret.txt", "rel-link");
    link("/etc/passwd", "passwd-link");
    link(
        &format!("/proc/self/root{}", outside.join("secret.txt").display()),
        "proc-link",
    );

    let rw = Virtiofsd::start(root, &share, "rw", "never", false);
    let ro = Virtiofsd::start(root, &ro_share, "ro", "never", true);
    let mut args = rw.fs_arg("husk-share");
    args.extend(ro.fs_arg("husk-ro"));
    let mut vm = spawn_vm(&a, "fs husk-share husk-ro", args);

    let mut lines = vm
        .console_until("RESULT fs m", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\nstderr: {}\nvirtiofsd: {}", vm.stderr(), rw.log()));
    // While the VM runs: remove a directory and add one (a new container's rootfs, a volume).
    std::fs::remove_dir(share.join("gone")).unwrap();
    std::fs::create_dir(share.join("late")).unwrap();
    std::fs::write(share.join("late/hello"), "added-after-boot").unwrap();
    lines.extend(
        vm.console_until("HUSK-E2E-DONE", Duration::from_secs(120))
            .unwrap_or_else(|e| {
                panic!(
                    "{e}\nstderr: {}\nvirtiofsd rw: {}\nvirtiofsd ro: {}",
                    vm.stderr(),
                    rw.log(),
                    ro.log()
                )
            }),
    );
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    let stderr = vm.stderr();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    let all = lines.join("\n");
    assert!(
        !all.contains(&secret),
        "the guest read a host file outside the share:\n{all}"
    );
    let r = result_lines(&lines);
    for e in [
        "fs mounted",
        "before written-before-boot",
        "late added-after-boot",
        "removed gone",
        "write ok",
        "crosslink refused",
        "insidelink ok",
        "guestsymlink ok",
        "roread read-only-content",
        "rowrite refused",
        "umount ok",
    ] {
        assert!(r.iter().any(|x| x == e), "missing {e:?} in {r:#?}");
    }
    // The symlink planted to /etc/passwd resolves in the guest: its own passwd, never the host's.
    assert!(
        r.iter().any(|x| x == "passwdlink guest-passwd-line"),
        "{r:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).unwrap(),
        "guest-wrote-this\n"
    );
    // The guest's links stay inside the share: a hard link within it, a symlink as a plain link.
    assert_eq!(
        std::fs::read_to_string(share.join("inside-link")).unwrap(),
        "written-before-boot"
    );
    assert!(!share.join("cross-link").exists());
    assert_eq!(
        std::fs::read_link(share.join("guest-symlink")).unwrap(),
        Path::new("/proc/self/root/etc/hostname")
    );
    // Nothing changed in the read-only share, nothing outside the share.
    let ro_names: Vec<_> = std::fs::read_dir(&ro_share)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(ro_names, vec![std::ffi::OsString::from("keep.txt")]);
    assert_eq!(
        std::fs::read_to_string(ro_share.join("keep.txt")).unwrap(),
        "read-only-content"
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).unwrap(),
        secret
    );
}

#[test]
fn vmm_survives_the_daemon_dying() {
    let a = vm_test_setup();
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let mut d = Virtiofsd::start(tmp.path(), &share, "d", "never", false);
    let mut opts = VmOptions::scenario(&a, "fsdeath husk-share", d.fs_arg("husk-share"));
    opts.control_socket = true;
    let mut vm = VmProcess::spawn(&a, &opts).unwrap();
    vm.console_until("RESULT fs mounted", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\nstderr: {}\nvirtiofsd: {}", vm.stderr(), d.log()));
    let fs_stats = |vm: &VmProcess| {
        let st = vm.control(r#"{"op":"stats"}"#).unwrap();
        st["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["type"] == "fs").cloned())
            .unwrap_or_else(|| panic!("no fs device in the control socket's stats: {st}"))
    };
    // Linux sends FUSE_INIT in the background: `mount` can return before the daemon's reply,
    // and with it the first forwarded interrupt, arrives.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let before = loop {
        let now = fs_stats(&vm);
        if now["interrupts"].as_u64().unwrap() > 0 || std::time::Instant::now() >= deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (&before["tag"], &before["active"], &before["daemon_alive"]),
        (&"husk-share".into(), &true.into(), &true.into()),
        "{before}"
    );
    assert!(
        before["interrupts"].as_u64().unwrap() > 0,
        "the daemon's FUSE_INIT reply reached the guest through the VMM: {before}"
    );
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // The guest sleeps 4 s after mounting; the VMM sees the socket hang up within milliseconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let now = fs_stats(&vm);
        if now["daemon_alive"] == false {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stats still show the daemon alive 2 s after it was killed: {now}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest = vm
        .console_until("HUSK-E2E-DONE", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\nstderr: {}", vm.stderr()));
    assert!(
        result_lines(&rest).iter().any(|r| r == "still running"),
        "{rest:?}"
    );
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    let stderr = vm.stderr();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(
        stderr.contains("virtio-fs: daemon failed"),
        "the VMM did not notice the daemon dying: {stderr}"
    );
}

#[test]
fn vmm_refuses_a_share_without_a_daemon() {
    let a = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(&a.vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .arg("--fs")
        .arg(format!(
            "socket={},tag=x",
            tmp.path().join("absent.sock").display()
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("absent.sock does not exist"), "{err}");
}
