//! `MountStorage` / `UnmountStorage` on the host: `storage_in_private_mount_ns`
//! re-runs this binary in a private mount namespace with a fresh tmpfs on
//! /run (so /run/husk is the test's own and nothing leaks to the host), and
//! runs `storage_inner` there. `block_device_rootfs_in_private_mount_ns`
//! does the same for a container whose rootfs is an ext4 file system on a
//! loop device, mounted through `MountStorage`'s block-device path.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use husk_agent::container::{CreateParams, EngineError};
use husk_agent::storage::Storage;

fn opts(o: &[&str]) -> Vec<String> {
    o.iter().map(|s| s.to_string()).collect()
}

/// The mountinfo line of `target`, if it is a mount point.
fn mountinfo(target: &str) -> Option<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(target))
        .map(str::to_string)
}

#[test]
fn storage_in_private_mount_ns() {
    run_in_private_mount_ns("storage_inner", &[]);
}

/// Re-runs this binary's ignored test `name` in a private mount namespace
/// with a fresh tmpfs on /run, with `env`; fails if it fails.
fn run_in_private_mount_ns(name: &str, env: &[(&str, &str)]) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "storage tests need root (mounts); run them as root"
    );
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd.envs(env.iter().copied());
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/run".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("re-running the test binary");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "inner test failed:\n{text}");
    assert!(
        text.contains(&format!("test {name} ... ok")),
        "inner test did not run:\n{text}"
    );
}

#[test]
#[ignore = "run by storage_in_private_mount_ns (needs a private /run)"]
fn storage_inner() {
    assert!(
        mountinfo("/run").is_some_and(|l| l.contains(" - tmpfs ")),
        "not in the private namespace"
    );
    // A fake /sys/block with two serials, whose /dev nodes do not exist.
    let fake = tempfile::tempdir().unwrap();
    let sys_block = fake.path().join("block");
    for (dev, serial) in [("vda", "rootfs-1\n"), ("vdb", "data")] {
        std::fs::create_dir_all(sys_block.join(dev)).unwrap();
        std::fs::write(sys_block.join(dev).join("serial"), serial).unwrap();
    }
    std::fs::create_dir_all(sys_block.join("vdc")).unwrap(); // no serial
    let s = Storage::new(sys_block, fake.path().join("dev"));

    // tmpfs with data options and flags; the target's parents are created.
    s.mount(
        "tmpfs",
        "",
        "/run/husk/t/one",
        &opts(&["size=1m", "mode=700", "nosuid", "nodev"]),
        false,
    )
    .unwrap();
    let mi = mountinfo("/run/husk/t/one").expect("mounted");
    assert!(mi.contains("nosuid") && mi.contains("nodev"), "{mi}");
    assert!(mi.contains("size=1024k"), "{mi}");
    let mode = std::fs::metadata("/run/husk/t/one")
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o700);
    std::fs::write("/run/husk/t/one/file", "hello").unwrap();
    // Idempotent; another source at the same target is refused.
    s.mount("tmpfs", "", "/run/husk/t/one", &[], false).unwrap();
    let e = s
        .mount("bind", "/run", "/run/husk/t/one", &[], false)
        .unwrap_err();
    assert!(matches!(e, EngineError::AlreadyExists(_)), "{e}");

    // A read-only bind mount of it: the flags take effect (remount).
    s.mount("bind", "/run/husk/t/one", "/run/husk/b", &[], true)
        .unwrap();
    assert_eq!(
        std::fs::read_to_string("/run/husk/b/file").unwrap(),
        "hello"
    );
    let e = std::fs::write("/run/husk/b/other", "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(s.targets(), ["/run/husk/b", "/run/husk/t/one"]);

    // Block devices: serial lookup, missing nodes.
    let e = s
        .mount("ext4", "serial:rootfs-1", "/run/husk/blk", &[], false)
        .unwrap_err();
    assert!(
        matches!(&e, EngineError::FailedPrecondition(m) if m.contains("vda")),
        "{e}"
    );
    let e = s
        .mount("erofs", "serial:nope", "/run/husk/blk", &[], true)
        .unwrap_err();
    assert!(
        matches!(&e, EngineError::FailedPrecondition(m) if m.contains("\"nope\"")),
        "{e}"
    );
    let e = s
        .mount("xfs", "/dev/vdzz", "/run/husk/blk", &[], false)
        .unwrap_err();
    assert!(matches!(e, EngineError::FailedPrecondition(_)), "{e}");
    assert!(!Path::new("/run/husk/blk").exists(), "no directory left");
    // An unknown option names itself; nothing is created.
    let e = s
        .mount("tmpfs", "", "/run/husk/u", &opts(&["nodev", "exec"]), false)
        .unwrap_err();
    assert_eq!(e.to_string(), "options[1]: unknown mount option \"exec\"");
    assert!(!Path::new("/run/husk/u").exists());
    // A target reached through a symlink is refused.
    std::os::unix::fs::symlink("/tmp", "/run/husk/link").unwrap();
    let e = s
        .mount("tmpfs", "", "/run/husk/link/x", &[], false)
        .unwrap_err();
    assert!(e.to_string().starts_with("target:"), "{e}");
    // A bind source that does not exist.
    let e = s
        .mount("bind", "/run/husk/none", "/run/husk/c", &[], false)
        .unwrap_err();
    assert!(matches!(e, EngineError::FailedPrecondition(_)), "{e}");

    // Unmount: only what MountStorage mounted; busy mounts detach lazily.
    let e = s.unmount("/run/husk/link").unwrap_err();
    assert!(matches!(e, EngineError::NotFound(_)), "{e}");
    let busy = std::fs::File::open("/run/husk/b/file").unwrap();
    s.unmount("/run/husk/b").unwrap();
    assert!(mountinfo("/run/husk/b").is_none());
    assert!(!Path::new("/run/husk/b").exists(), "directory removed");
    drop(busy);
    s.unmount("/run/husk/t/one").unwrap();
    assert!(
        !Path::new("/run/husk/t").exists(),
        "created parents removed"
    );
    let e = s.unmount("/run/husk/t/one").unwrap_err();
    assert!(matches!(e, EngineError::NotFound(_)), "{e}");
    assert!(s.targets().is_empty());
}

/// The loop device of [`block_device_rootfs_in_private_mount_ns`].
const LOOP_ENV: &str = "HUSK_TEST_LOOP_DEV";
/// The virtio-blk serial the inner test gives it in a fake /sys/block.
const SERIAL: &str = "husk-rootfs-blk";

/// Detaches a loop device when dropped.
struct LoopDev(String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A busybox rootfs copied into an ext4 image (`mkfs.ext4 -d`), attached
/// to a loop device; the inner test mounts it by serial and runs a
/// container from it. Afterwards the image holds what the container wrote.
#[test]
fn block_device_rootfs_in_private_mount_ns() {
    let rootfs = common::busybox_rootfs();
    std::fs::write(rootfs.path().join("marker"), "from-the-image\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("rootfs.ext4");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    ok(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(rootfs.path())
        .arg(&img));
    let dev = ok(Command::new("losetup").args(["-f", "--show"]).arg(&img))
        .trim()
        .to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    let guard = LoopDev(dev.clone());
    run_in_private_mount_ns("block_device_rootfs_inner", &[(LOOP_ENV, &dev)]);
    drop(guard);
    let written = ok(Command::new("debugfs")
        .args(["-R", "cat /work/written"])
        .arg(&img));
    assert_eq!(written, "from-the-container\n");
}

#[test]
#[ignore = "run by block_device_rootfs_in_private_mount_ns (needs its loop device and a private /run)"]
fn block_device_rootfs_inner() {
    let dev = std::env::var(LOOP_ENV).unwrap_or_else(|_| {
        panic!("{LOOP_ENV} is not set: this test is run by block_device_rootfs_in_private_mount_ns")
    });
    assert!(
        mountinfo("/run").is_some_and(|l| l.contains(" - tmpfs ")),
        "not in the private namespace"
    );
    // A fake /sys/block naming the loop device by serial, as virtio-blk does.
    let fake = tempfile::tempdir().unwrap();
    let name = dev.trim_start_matches("/dev/");
    std::fs::create_dir_all(fake.path().join(name)).unwrap();
    std::fs::write(fake.path().join(name).join("serial"), SERIAL).unwrap();
    let s = Storage::new(fake.path().to_path_buf(), "/dev".into());
    let target = "/run/husk/blk/rootfs";
    s.mount(
        "ext4",
        &format!("serial:{SERIAL}"),
        target,
        &opts(&["nodev"]),
        false,
    )
    .unwrap();
    let mi = mountinfo(target).expect("mounted");
    assert!(mi.contains(&format!(" - ext4 {dev} ")), "{mi}");

    let (e, rt) = common::engine();
    let spec = common::spec(
        "cat /marker; grep ' / / ' /proc/self/mountinfo; echo from-the-container > /work/written",
    );
    let out = rt.block_on(async {
        let e2 = Arc::clone(&e);
        let p = CreateParams {
            id: "blk".into(),
            spec_json: serde_json::to_vec(&spec).unwrap(),
            rootfs: target.into(),
            stdin: false,
            terminal: false,
        };
        tokio::task::spawn_blocking(move || e2.create(p))
            .await
            .unwrap()
            .unwrap();
        let p = e.process("blk", "").unwrap();
        let mut rx = husk_agent::container::stdio::read_stream(&p.stdio.stdout, 4096, 2).unwrap();
        let e2 = Arc::clone(&e);
        tokio::task::spawn_blocking(move || e2.start("blk"))
            .await
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            out.extend(c.unwrap());
        }
        let exit = tokio::time::timeout(Duration::from_secs(20), e.wait("blk", ""))
            .await
            .expect("container did not exit")
            .unwrap();
        assert_eq!(exit.status, 0);
        e.remove("blk", false).await.unwrap();
        String::from_utf8(out).unwrap()
    });
    // From inside: the image's file, and its root is the ext4 on the device.
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("from-the-image"), "{out}");
    let root = lines.next().unwrap_or_default();
    assert!(root.contains(&format!(" - ext4 {dev} ")), "{out}");
    s.unmount(target).unwrap();
    assert!(mountinfo(target).is_none());
}
