//! Shared helpers for the container tests: an offline busybox rootfs and
//! OCI specs derived from oci-spec's default (runc-like) spec.

#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use husk_agent::container::{Engine, EngineConfig};
use husk_agent::reaper::Reaper;
use serde_json::{json, Value};

/// One runtime, reaper and engine per test binary, built like the agent's (2 workers, at most 16
/// blocking threads), without cgroups (this host has no cgroup2 controllers; container_cgroup.rs
/// builds its own). The reaper reaps *every* child of the test process: tests in a binary that
/// uses this must not wait for children themselves.
pub fn engine() -> (Arc<Engine>, &'static tokio::runtime::Runtime) {
    static RT: OnceLock<(tokio::runtime::Runtime, Arc<Engine>)> = OnceLock::new();
    let (rt, e) = RT.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(16)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let reaper = Reaper::new();
        let r = Arc::clone(&reaper);
        rt.spawn(async move { r.run().await });
        let cfg = EngineConfig {
            cgroup_root: "/nonexistent-cgroup2".into(),
            ..EngineConfig::default()
        };
        let e = rt.block_on(async { Engine::new(cfg, reaper) });
        (rt, e)
    });
    (Arc::clone(e), rt)
}

/// Applets linked into the test rootfs.
pub const APPLETS: &[&str] = &[
    "sh", "id", "grep", "touch", "cat", "mkdir", "hostname", "wc", "ls", "sleep", "true", "false",
    "echo", "env", "ps", "tty", "stat", "head", "dd", "seq", "stty", "readlink", "tr",
];

/// Fails (never skips) when a prerequisite is missing.
pub fn require_root_and_busybox() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "container tests need root (namespaces, mounts); run them as root"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "container tests need a static busybox at /bin/busybox (Debian package busybox-static)"
    );
}

/// A busybox rootfs in a temp dir: /bin/busybox plus HARD links for every
/// applet (a symlinked applet masked by a masked path would mask busybox
/// itself), /etc/passwd and /etc/group with a user `alice`.
pub fn busybox_rootfs() -> tempfile::TempDir {
    require_root_and_busybox();
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "work",
        "home/alice",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let bb = r.join("bin/busybox");
    std::fs::copy("/bin/busybox", &bb).unwrap();
    // A fixed applet list: `busybox --list` would need a child process,
    // which the agent's reaper in the test binary could reap first.
    for applet in APPLETS {
        std::fs::hard_link(&bb, r.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        r.join("etc/group"),
        "root:x:0:\nstaff:x:50:alice\nwheel:x:10:bob\nalice:x:1000:\n",
    )
    .unwrap();
    dir
}

/// oci-spec's default spec running `sh -c script`, with a writable root
/// and a tmpfs on /tmp.
pub fn spec(script: &str) -> Value {
    let mut v = serde_json::to_value(oci_spec::runtime::Spec::default()).unwrap();
    v["root"]["readonly"] = json!(false);
    v["process"]["args"] = json!(["sh", "-c", script]);
    v["hostname"] = json!("husk-test");
    v["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}));
    v
}

/// All five capability sets set to `caps`.
pub fn set_caps(v: &mut Value, caps: &[&str]) {
    for set in [
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    ] {
        v["process"]["capabilities"][set] = json!(caps);
    }
}
