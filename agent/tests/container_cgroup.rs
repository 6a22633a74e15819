//! cgroup v2 behaviour of the container engine.
//!
//! This host's cgroups are v1 (hybrid), so `cgroup_v2_in_private_mount_ns`
//! re-runs this test binary in a private mount namespace with its own
//! cgroup2 mount and runs `cgroup_v2_inner` there. All controllers are bound
//! to v1 here, so the v2 hierarchy has none: freezing, process placement,
//! cgroup.kill, stats and cleanup are tested; limits and OOM need the
//! controllers and are in `#[ignore]`d tests that `make test` runs in the
//! test host (a cgroup v2 guest).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use husk_agent::container::{CreateParams, Engine, EngineConfig, EngineError};
use husk_agent::reaper::Reaper;
use serde_json::json;

const ENV: &str = "HUSK_TEST_CGROUP2_ROOT";

#[test]
fn cgroup_v2_in_private_mount_ns() {
    common::require_root_and_busybox();
    let mnt = tempfile::tempdir().unwrap();
    let target = mnt.path().to_path_buf();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--exact",
        "cgroup_v2_inner",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ENV, &target);
    let t = std::ffi::CString::new(target.to_str().unwrap()).unwrap();
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    c"cgroup2".as_ptr(),
                    t.as_ptr(),
                    c"cgroup2".as_ptr(),
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
        text.contains("test cgroup_v2_inner ... ok"),
        "inner test did not run:\n{text}"
    );
    // The mount was private to the child's namespace.
    assert!(!target.join("cgroup.procs").exists());
}

fn engine(root: &Path) -> (tokio::runtime::Runtime, Arc<Engine>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let reaper = Reaper::new();
    let r = Arc::clone(&reaper);
    rt.spawn(async move { r.run().await });
    let cfg = EngineConfig {
        cgroup_root: root.to_path_buf(),
        oom_poll: Duration::from_millis(50),
        ..EngineConfig::default()
    };
    let e = rt.block_on(async { Engine::new(cfg, reaper) });
    (rt, e)
}

fn create(
    rt: &tokio::runtime::Runtime,
    e: &Arc<Engine>,
    id: &str,
    spec: serde_json::Value,
    rootfs: &Path,
) -> Result<i32, EngineError> {
    let e = Arc::clone(e);
    let p = CreateParams {
        id: id.into(),
        spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs: rootfs.to_path_buf(),
        stdin: false,
        terminal: false,
    };
    rt.block_on(async move {
        tokio::task::spawn_blocking(move || e.create(p))
            .await
            .unwrap()
    })
}

fn blocking<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    rt.block_on(async move { tokio::task::spawn_blocking(f).await.unwrap() })
}

#[test]
#[ignore = "run by cgroup_v2_in_private_mount_ns (needs its private cgroup2 mount)"]
fn cgroup_v2_inner() {
    let root = PathBuf::from(std::env::var_os(ENV).unwrap_or_else(|| {
        panic!("{ENV} is not set: this test is run by cgroup_v2_in_private_mount_ns")
    }));
    let rootfs = common::busybox_rootfs();
    let (rt, e) = engine(&root);
    assert!(e.has_cgroups(), "{} is not cgroup2", root.display());

    let pid = create(&rt, &e, "cg", common::spec("sleep 1000"), rootfs.path()).unwrap();
    let cg = root.join("husk/cg");
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    assert_eq!(
        procs.trim(),
        pid.to_string(),
        "init is placed before it runs"
    );
    let e2 = Arc::clone(&e);
    blocking(&rt, move || e2.start("cg")).unwrap();

    // The cgroup namespace is rooted at the container's cgroup.
    let e2 = Arc::clone(&e);
    let pj = serde_json::to_vec(
        &json!({"user": {"uid": 0, "gid": 0}, "args": ["cat", "/proc/self/cgroup"],
        "cwd": "/", "env": ["PATH=/bin"]}),
    )
    .unwrap();
    blocking(&rt, move || {
        e2.exec(husk_agent::container::ExecParams {
            id: "cg".into(),
            exec_id: "cgroup".into(),
            process_json: pj,
            stdin: false,
            terminal: false,
        })
    })
    .unwrap();
    let p = e.process("cg", "cgroup").unwrap();
    let out = rt.block_on(async {
        let mut rx = husk_agent::container::stdio::read_stream(&p.stdio.stdout, 4096, 2).unwrap();
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            out.extend(c.unwrap());
        }
        String::from_utf8(out).unwrap()
    });
    assert!(out.lines().any(|l| l == "0::/"), "{out}");

    // Pause / resume through cgroup.freeze.
    let e2 = Arc::clone(&e);
    blocking(&rt, move || e2.set_paused("cg", true)).unwrap();
    assert!(e.is_paused("cg").unwrap());
    let events = std::fs::read_to_string(cg.join("cgroup.events")).unwrap();
    assert!(events.contains("frozen 1"), "{events}");
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(!state.contains(") R "), "{state}");
    let e2 = Arc::clone(&e);
    blocking(&rt, move || e2.set_paused("cg", false)).unwrap();
    assert!(!e.is_paused("cg").unwrap());

    let (_, pids) = e.list("cg", 100).unwrap();
    assert_eq!(pids, [pid]);
    let stats = e.stats("cg").unwrap();
    assert_eq!(stats.oom_kills, 0);

    // Limits need controllers, which this v2 hierarchy lacks: a clear error.
    let mut s = common::spec("true");
    s["linux"]["resources"] = json!({"pids": {"limit": 10}});
    let err = create(&rt, &e, "limited", s, rootfs.path()).unwrap_err();
    assert!(err.to_string().contains("pids.max"), "{err}");
    assert!(
        !root.join("husk/limited").exists(),
        "failed create cleans up its cgroup"
    );

    // Device rules: an eBPF program on the cgroup. containerd's "deny all"
    // still leaves the default nodes usable; another device needs a rule,
    // for mknod and for open separately.
    let script = "head -c 4 /dev/zero | wc -c; mknod /dev/tun2 c 10 200 && echo mknod-ok; \
                  true < /dev/tun2 && echo open-ok; true";
    for (id, extra, want) in [
        ("dev-deny", json!(null), "4\n"),
        ("dev-m", json!("m"), "4\nmknod-ok\n"),
        ("dev-rm", json!("rm"), "4\nmknod-ok\nopen-ok\n"),
    ] {
        let mut s = common::spec(script);
        common::set_caps(&mut s, &["CAP_MKNOD"]);
        let mut rules = vec![json!({"allow": false, "access": "rwm"})];
        if let Some(access) = extra.as_str() {
            rules.push(
                json!({"allow": true, "type": "c", "major": 10, "minor": 200, "access": access}),
            );
        }
        s["linux"]["resources"] = json!({ "devices": rules });
        create(&rt, &e, id, s, rootfs.path()).unwrap();
        let p = e.process(id, "").unwrap();
        let e2 = Arc::clone(&e);
        let id2 = id.to_string();
        blocking(&rt, move || e2.start(&id2)).unwrap();
        let out = rt.block_on(async {
            let mut rx =
                husk_agent::container::stdio::read_stream(&p.stdio.stdout, 4096, 2).unwrap();
            let mut out = Vec::new();
            while let Some(c) = rx.recv().await {
                out.extend(c.unwrap());
            }
            String::from_utf8(out).unwrap()
        });
        assert_eq!(rt.block_on(e.wait(id, "")).unwrap().status, 0, "{id}");
        assert_eq!(out, want, "{id}");
        rt.block_on(e.remove(id, false)).unwrap();
    }

    // Force removal kills through the cgroup and removes it.
    rt.block_on(e.remove("cg", true)).unwrap();
    assert!(!cg.exists());
    assert_eq!(rt.block_on(async { e.ids() }).len(), 0);
}

/// Needs the memory controller on cgroup v2 (the test host / a guest), at
/// `HUSK_TEST_CGROUP2_ROOT` or /sys/fs/cgroup.
#[test]
#[ignore = "needs cgroup v2 with the memory controller: `make test` runs it in the test host"]
fn oom_kill_is_reported_and_exits_137() {
    let root = std::env::var_os(ENV).map_or_else(|| PathBuf::from("/sys/fs/cgroup"), PathBuf::from);
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    assert!(
        controllers.split_whitespace().any(|c| c == "memory"),
        "{} has no cgroup v2 memory controller (controllers: {controllers:?})",
        root.display()
    );
    let rootfs = common::busybox_rootfs();
    let (rt, e) = engine(&root);
    let mut events = e.oom_events();
    let mut s = common::spec("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived");
    s["linux"]["resources"] = json!({"memory": {"limit": 16_777_216, "swap": 16_777_216}});
    create(&rt, &e, "oom", s, rootfs.path()).unwrap();
    let cg = root.join("husk/oom");
    assert_eq!(
        std::fs::read_to_string(cg.join("memory.max"))
            .unwrap()
            .trim(),
        "16777216"
    );
    let e2 = Arc::clone(&e);
    blocking(&rt, move || e2.start("oom")).unwrap();
    let exit = rt.block_on(e.wait("oom", "")).unwrap();
    assert_eq!(exit.status, 137);
    assert!(exit.oom_killed);
    let ev = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), events.recv()).await })
        .expect("no OOM event")
        .unwrap();
    assert_eq!(ev, "oom");
    rt.block_on(e.remove("oom", false)).unwrap();
}

/// Needs the cpu, cpuset and memory controllers on cgroup v2 (the test
/// host), at `HUSK_TEST_CGROUP2_ROOT` or /sys/fs/cgroup. Reads the limits
/// from inside the container, through its own cgroup mount (the cgroup
/// namespace is rooted at the container's cgroup) and /proc/self/status.
#[test]
#[ignore = "needs cgroup v2 with cpu, cpuset and memory: `make test` runs it in the test host"]
fn cpu_cpuset_swap_limits_seen_inside() {
    let root = std::env::var_os(ENV).map_or_else(|| PathBuf::from("/sys/fs/cgroup"), PathBuf::from);
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    for c in ["cpu", "cpuset", "memory"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "{} has no cgroup v2 {c} controller (controllers: {controllers:?})",
            root.display()
        );
    }
    let rootfs = common::busybox_rootfs();
    let (rt, e) = engine(&root);
    let script = "cd /sys/fs/cgroup && cat cpu.max cpuset.cpus cpuset.cpus.effective memory.max \
                  memory.swap.max && grep Cpus_allowed_list /proc/self/status";
    let mut s = common::spec(script);
    s["linux"]["resources"] = json!({
        "cpu": {"quota": 50_000, "period": 200_000, "cpus": "0"},
        // OCI's swap is memory + swap: 32 MiB of swap.
        "memory": {"limit": 33_554_432, "swap": 67_108_864},
    });
    create(&rt, &e, "limits", s, rootfs.path()).unwrap();
    let p = e.process("limits", "").unwrap();
    let e2 = Arc::clone(&e);
    blocking(&rt, move || e2.start("limits")).unwrap();
    let out = rt.block_on(async {
        let mut rx = husk_agent::container::stdio::read_stream(&p.stdio.stdout, 4096, 2).unwrap();
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            out.extend(c.unwrap());
        }
        String::from_utf8(out).unwrap()
    });
    let exit = rt.block_on(e.wait("limits", "")).unwrap();
    assert_eq!(exit.status, 0, "{out}");
    assert_eq!(
        out,
        "50000 200000\n0\n0\n33554432\n33554432\nCpus_allowed_list:\t0\n"
    );
    rt.block_on(e.remove("limits", false)).unwrap();
    assert!(!root.join("husk/limits").exists());
}
