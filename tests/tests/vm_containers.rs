//! End to end: OCI containers inside a Husk microVM, driven only through the agent API, as the
//! containerd shim will drive them. The host builds a busybox-static rootfs per container offline,
//! puts them in a virtio-fs share (virtiofsd), the guest mounts the share with `MountStorage`, and
//! containers are created from containerd 1.6's default spec (`ctr oci spec`) with the changes the
//! shim makes (no network namespace, cgroupsPath `/default/ID`). Every behaviour is asserted from
//! inside the container: exit codes, stdio, env/cwd/user, tty, exec, signals, pause/resume, stats,
//! process lists, resource updates and OOM, a read-only rootfs, seccomp, namespace sharing between
//! containers, removal. One VM boot for everything (each boot costs seconds under emulation).
//! Needs KVM, root and build/testhost/virtiofsd: run through tests/testhost/run (make e2e).

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::client::{
    AgentClient, ClientError, ClientOptions, CreateContainer, MountStorage, ProcessExit,
};
use husk_tests::virtiofsd::Virtiofsd;
use husk_tests::{vm_test_setup, VmFailure, VmOptions, VmProcess};
use serde_json::{json, Value};

/// What `ctr oci spec` (containerd 1.6) prints: the base of every container spec containerd gives a
/// shim (CRI adds more on top).
const CONTAINERD_DEFAULT_SPEC: &str = r#"{
  "ociVersion": "1.0.2-dev",
  "process": {
    "user": {"uid": 0, "gid": 0},
    "cwd": "/",
    "capabilities": {
      "bounding": ["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FSETID","CAP_FOWNER","CAP_MKNOD","CAP_NET_RAW",
        "CAP_SETGID","CAP_SETUID","CAP_SETFCAP","CAP_SETPCAP","CAP_NET_BIND_SERVICE","CAP_SYS_CHROOT",
        "CAP_KILL","CAP_AUDIT_WRITE"],
      "effective": ["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FSETID","CAP_FOWNER","CAP_MKNOD","CAP_NET_RAW",
        "CAP_SETGID","CAP_SETUID","CAP_SETFCAP","CAP_SETPCAP","CAP_NET_BIND_SERVICE","CAP_SYS_CHROOT",
        "CAP_KILL","CAP_AUDIT_WRITE"],
      "permitted": ["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FSETID","CAP_FOWNER","CAP_MKNOD","CAP_NET_RAW",
        "CAP_SETGID","CAP_SETUID","CAP_SETFCAP","CAP_SETPCAP","CAP_NET_BIND_SERVICE","CAP_SYS_CHROOT",
        "CAP_KILL","CAP_AUDIT_WRITE"]
    },
    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
    "noNewPrivileges": true
  },
  "root": {"path": "rootfs"},
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid","noexec","nodev"]},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid","strictatime","mode=755","size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620","gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid","noexec","nodev","mode=1777","size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid","noexec","nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid","noexec","nodev","ro"]},
    {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid","strictatime","mode=755","size=65536k"]}
  ],
  "linux": {
    "resources": {"devices": [{"allow": false, "access": "rwm"}]},
    "cgroupsPath": "/default",
    "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
    "maskedPaths": ["/proc/acpi","/proc/asound","/proc/kcore","/proc/keys","/proc/latency_stats",
      "/proc/timer_list","/proc/timer_stats","/proc/sched_debug","/sys/firmware","/proc/scsi"],
    "readonlyPaths": ["/proc/bus","/proc/fs","/proc/irq","/proc/sys","/proc/sysrq-trigger"]
  }
}"#;

/// Busybox applets hard-linked into each rootfs (hard links: CRI masks paths like /proc/kcore by
/// bind-mounting over them, and a masked symlinked applet would mask busybox itself).
const APPLETS: &[&str] = &[
    "sh", "id", "cat", "echo", "sleep", "mkdir", "touch", "hostname", "ls", "ps", "tty", "stty",
    "head", "tr", "grep", "readlink", "pwd", "env", "wc", "true", "false", "dd", "stat",
];

/// The virtio-fs tag of the pod share, and where the guest mounts it.
const TAG: &str = "husk-pod";
const SHARED: &str = "/run/husk/shared";

fn build_rootfs(dir: &Path) {
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "home/alice",
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let bb = dir.join("bin/busybox");
    std::fs::copy("/bin/busybox", &bb).unwrap();
    for a in APPLETS {
        std::fs::hard_link(&bb, dir.join("bin").join(a)).unwrap();
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\nstaff:x:50:alice\nalice:x:1000:\n",
    )
    .unwrap();
    std::os::unix::fs::chown(dir.join("home/alice"), Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(
        dir.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
}

/// containerd's default spec for container `id` running `args`, as the shim passes it on.
fn spec(id: &str, args: &[&str]) -> Value {
    let mut v: Value = serde_json::from_str(CONTAINERD_DEFAULT_SPEC).unwrap();
    v["process"]["args"] = json!(args);
    v["process"]["env"] =
        json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    // containerd: `/<namespace>/<id>`.
    v["linux"]["cgroupsPath"] = json!(format!("/default/{id}"));
    // The shim drops the network namespace: containers use the guest's (the pod's) network.
    v["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|n| n["type"] != "network");
    // CRI adds the cgroup mount.
    v["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]
    }));
    v
}

fn process(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "args": args,
        "cwd": "/",
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
    }))
    .unwrap()
}

/// Whatever a container printed, with its exit.
#[derive(Debug)]
struct Ran {
    exit: ProcessExit,
    stdout: String,
    stderr: String,
}

fn code(e: &ClientError) -> String {
    match e {
        ClientError::Rpc { code, .. } => format!("{code:?}"),
        e => format!("not an RPC error: {e}"),
    }
}

/// Fails the test if `f` takes longer than `secs`.
async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {secs} s"))
}

struct Pod {
    c: AgentClient,
}

impl Pod {
    fn rootfs(id: &str) -> String {
        format!("{SHARED}/{id}/rootfs")
    }

    async fn create(&self, id: &str, spec: &Value, stdin: bool, terminal: bool) -> u32 {
        self.c
            .create_container(CreateContainer {
                container_id: id.into(),
                oci_spec_json: serde_json::to_vec(spec).unwrap(),
                rootfs_path: Self::rootfs(id),
                stdin,
                terminal,
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {id}: {e}"))
    }

    async fn output(&self, id: &str, exec_id: &str) -> (String, String) {
        let mut out = self.c.read_stdout(id, exec_id).await.unwrap();
        let mut err = self.c.read_stderr(id, exec_id).await.unwrap();
        let out = within(60, "stdout EOF", out.read_to_end(1 << 20))
            .await
            .unwrap();
        let err = within(60, "stderr EOF", err.read_to_end(1 << 20))
            .await
            .unwrap();
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    async fn wait(&self, id: &str, exec_id: &str) -> ProcessExit {
        self.c
            .wait_process(id, exec_id, Some(Duration::from_secs(120)))
            .await
            .unwrap_or_else(|e| panic!("WaitProcess {id}/{exec_id}: {e}"))
    }

    /// Create, start, wait; then its output.
    async fn run(&self, id: &str, spec: &Value) -> Ran {
        self.create(id, spec, false, false).await;
        self.c.start_container(id).await.unwrap();
        let exit = self.wait(id, "").await;
        let (stdout, stderr) = self.output(id, "").await;
        Ran {
            exit,
            stdout,
            stderr,
        }
    }

    /// Runs `args` in the running container `id` as exec `exec_id`.
    async fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> Ran {
        self.c
            .exec_process(id, exec_id, process(args), false, false)
            .await
            .unwrap_or_else(|e| panic!("ExecProcess {id}/{exec_id}: {e}"));
        let exit = self.wait(id, exec_id).await;
        let (stdout, stderr) = self.output(id, exec_id).await;
        Ran {
            exit,
            stdout,
            stderr,
        }
    }

    async fn remove(&self, id: &str) {
        self.c
            .remove_container(id, true)
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e}"));
    }
}

/// Every container scenario, in one VM.
async fn scenarios(c: AgentClient) {
    let pod = Pod { c: c.clone() };
    let share = MountStorage {
        fstype: "virtiofs".into(),
        source: TAG.into(),
        target: SHARED.into(),
        options: vec!["nodev".into()],
        readonly: false,
    };
    c.mount_storage(share.clone()).await.unwrap();
    // Idempotent (the shim may retry after a lost reply).
    c.mount_storage(share).await.unwrap();

    // 1. Exit code, stdout/stderr, env, cwd, user from /etc/passwd, hostname, rlimits, masked paths,
    //    capabilities, cgroup namespace.
    let mut s = spec(
        "basic",
        &[
            "sh",
            "-c",
            "echo out; echo err >&2; echo \"foo=$FOO\"; pwd; id -u; id -g; id -G; hostname; \
             ulimit -n; wc -c < /proc/keys; stat -c %F:%t:%T /proc/kcore; \
             while read -r dev dir fs opts rest; do \
               case $dir in /dev/mqueue|/sys) echo \"$dir $fs ${opts%%,*}\";; esac; \
             done < /proc/self/mounts; \
             grep CapEff /proc/self/status; \
             cat /proc/self/cgroup; exit 3",
        ],
    );
    s["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!("FOO=bar"));
    s["process"]["cwd"] = json!("/home/alice");
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    s["hostname"] = json!("basic-host");
    let r = pod.run("basic", &s).await;
    assert_eq!(r.exit.exit_status, 3, "{r:?}");
    assert!(!r.exit.oom_killed);
    assert_eq!(r.stderr, "err\n", "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines[..12],
        [
            "out",
            "foo=bar",
            "/home/alice",
            "1000",
            "1000",
            "1000 50",
            "basic-host",
            "1024",
            "0", // /proc/keys is masked
            // /proc/kcore (the guest kernel has it: guest-kernel/pod.config) is masked by
            // bind-mounting /dev/null (character device 1:3) over it.
            "character special file:1:3",
            // The spec's mqueue and (read-only) sysfs mounts, in the spec's order.
            "/dev/mqueue mqueue rw",
            "/sys sysfs ro",
        ],
        "{r:?}"
    );
    // Without ambient capabilities a non-root process loses them at execve (as under runc).
    assert_eq!(lines[12], "CapEff:\t0000000000000000", "{r:?}");
    // containerd's spec has no cgroup namespace: the guest's cgroup path shows.
    assert_eq!(lines[13], "0::/default/basic", "{r:?}");
    pod.remove("basic").await;

    // 2. Stdin piped through, closed -> EOF.
    let s = spec(
        "stdin",
        &[
            "sh",
            "-c",
            "read first; echo \"first=$first\"; cat; echo end",
        ],
    );
    pod.create("stdin", &s, true, false).await;
    c.start_container("stdin").await.unwrap();
    c.write_stdin("stdin", "", b"hello\nworld\n".to_vec())
        .await
        .unwrap();
    c.write_stdin("stdin", "", b"again\n".to_vec())
        .await
        .unwrap();
    c.close_stdin("stdin", "").await.unwrap();
    let exit = pod.wait("stdin", "").await;
    let (out, _) = pod.output("stdin", "").await;
    assert_eq!(exit.exit_status, 0);
    assert_eq!(out, "first=hello\nworld\nagain\nend\n");
    pod.remove("stdin").await;

    // 3. A terminal: the process sees a tty with the size set before start.
    let mut s = spec(
        "tty",
        &[
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo is-a-tty; stty size; echo tty=$(tty); \
             echo fd0=$(readlink /proc/self/fd/0); echo pts=$(ls /dev/pts); \
             echo dev=$(stat -c %t:%T $(tty)); echo console=$(stat -c %t:%T /dev/console)",
        ],
    );
    s["process"]["terminal"] = json!(true);
    pod.create("tty", &s, false, true).await;
    c.resize_pty("tty", "", 40, 100).await.unwrap();
    let mut out = c.read_stdout("tty", "").await.unwrap();
    c.start_container("tty").await.unwrap();
    let exit = pod.wait("tty", "").await;
    let out = String::from_utf8(
        within(60, "tty output", out.read_to_end(1 << 20))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(exit.exit_status, 0, "{out}");
    assert!(
        out.contains("is-a-tty\r\n"),
        "a tty (with its \\r\\n): {out:?}"
    );
    assert!(out.contains("40 100"), "{out:?}");
    // The terminal is the container's own (its devpts, as under runc): `tty` names it, stdin is it, and
    // it exists in the container's /dev/pts.
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {out:?}"))
            .to_string()
    };
    let tty = field("tty=");
    let n = tty
        .strip_prefix("/dev/pts/")
        .filter(|n| n.parse::<u32>().is_ok())
        .unwrap_or_else(|| panic!("tty names /dev/pts/N: {out:?}"));
    assert_eq!(field("fd0="), tty, "{out:?}");
    assert!(
        field("pts=").split(' ').any(|p| p == n),
        "{tty} in the container's /dev/pts: {out:?}"
    );
    assert_eq!(
        field("console="),
        field("dev="),
        "the pty on /dev/console, as runc: {out:?}"
    );
    eprintln!("tty scenario output: {out:?}");
    pod.remove("tty").await;

    // 4. A long-running container: exec, signals, list, stats, update, pause/resume.
    let mut s = spec(
        "main",
        &[
            "sh",
            "-c",
            "trap 'exit 143' TERM; echo ready; while :; do sleep 1000 & wait $!; done",
        ],
    );
    s["hostname"] = json!("main-host");
    let main_pid = pod.create("main", &s, false, false).await;
    c.start_container("main").await.unwrap();
    let mut out = c.read_stdout("main", "").await.unwrap();
    let first = within(60, "main ready", out.next()).await.unwrap().unwrap();
    assert_eq!(first, b"ready\n");
    // Exec joins the container's namespaces: same hostname, the container's init is pid 1.
    let r = pod
        .exec(
            "main",
            "e1",
            &[
                "sh",
                "-c",
                "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; \
                 for n in pid ipc uts; do readlink /proc/self/ns/$n; done",
            ],
        )
        .await;
    assert_eq!(r.exit.exit_status, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "main-host", "{r:?}");
    assert!(lines[1].starts_with("sh -c trap"), "{r:?}");
    let main_ns: Vec<String> = lines[2..5].iter().map(|s| s.to_string()).collect();
    // A process killed by SIGTERM: 128 + 15.
    c.exec_process("main", "sleeper", process(&["sleep", "1000"]), false, false)
        .await
        .unwrap();
    let procs = c.list_processes("main").await.unwrap();
    assert_eq!(procs.processes[0].pid, main_pid);
    assert!(procs
        .processes
        .iter()
        .any(|p| p.exec_id == "sleeper" && p.exit_status.is_none()));
    assert!(procs
        .processes
        .iter()
        .any(|p| p.exec_id == "e1" && p.exit_status == Some(0)));
    assert!(procs.pids.contains(&main_pid), "{procs:?}");
    assert!(
        procs.pids.len() >= 3,
        "init, its sleep, the sleeper: {procs:?}"
    );
    c.signal_process("main", "sleeper", 15, false)
        .await
        .unwrap();
    assert_eq!(pod.wait("main", "sleeper").await.exit_status, 143);
    // Stats from the container's cgroup.
    let st = c.stats_container("main").await.unwrap();
    let mem = st.memory.unwrap();
    assert!(mem.usage_bytes > 0, "{mem:?}");
    let pids = st.pids.unwrap();
    assert!(pids.current >= 2, "{pids:?}");
    assert!(st.cpu.unwrap().usage_usec > 0);
    // UpdateContainer: new limits reach the cgroup.
    c.update_container(
        "main",
        br#"{"pids":{"limit":50},"memory":{"limit":100000000},"cpu":{"shares":512,"quota":50000,"period":100000}}"#
            .to_vec(),
    )
    .await
    .unwrap();
    let st = c.stats_container("main").await.unwrap();
    assert_eq!(st.pids.unwrap().limit, 50);
    assert_eq!(
        st.memory.unwrap().limit_bytes,
        99_999_744,
        "page-rounded memory.max"
    );
    let e = c
        .update_container("main", br#"{"cpu":{"cpus":"0-x"}}"#.to_vec())
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
    assert!(e.to_string().contains("resources_json.cpu.cpus"), "{e}");
    // Pause: a busy process stops accumulating CPU time until resumed.
    c.exec_process(
        "main",
        "spin",
        process(&["sh", "-c", "while :; do :; done"]),
        false,
        false,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.pause_container("main").await.unwrap();
    let cpu = |st: husk_proto::v1::StatsContainerResponse| st.cpu.unwrap().usage_usec;
    let frozen_at = cpu(c.stats_container("main").await.unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = cpu(c.stats_container("main").await.unwrap());
    assert!(
        still - frozen_at < 20_000,
        "paused container used {} us of CPU",
        still - frozen_at
    );
    c.resume_container("main").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resumed = cpu(c.stats_container("main").await.unwrap());
    assert!(
        resumed - still > 100_000,
        "resumed container used only {} us of CPU",
        resumed - still
    );
    c.signal_process("main", "spin", 9, false).await.unwrap();
    assert_eq!(pod.wait("main", "spin").await.exit_status, 137);

    // 5. A second container joins the first's pid, ipc and uts namespaces by path.
    let mut s = spec(
        "side",
        &[
            "sh",
            "-c",
            "hostname; for n in pid ipc uts; do readlink /proc/self/ns/$n; done; \
             cat /proc/1/cmdline | tr '\\0' ' '",
        ],
    );
    for ns in s["linux"]["namespaces"].as_array_mut().unwrap() {
        let t = ns["type"].as_str().unwrap().to_string();
        let name = match t.as_str() {
            "pid" => "pid",
            "ipc" => "ipc",
            "uts" => "uts",
            _ => continue,
        };
        ns["path"] = json!(format!("/proc/{main_pid}/ns/{name}"));
    }
    let r = pod.run("side", &s).await;
    assert_eq!(r.exit.exit_status, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "main-host", "{r:?}");
    assert_eq!(
        lines[1..4],
        main_ns[..],
        "same pid/ipc/uts namespaces: {r:?}"
    );
    assert!(
        lines[4].starts_with("sh -c trap"),
        "sees main's init as pid 1: {r:?}"
    );
    pod.remove("side").await;

    // SIGTERM to the init (it traps it) -> 143.
    c.signal_process("main", "", 15, false).await.unwrap();
    let exit = pod.wait("main", "").await;
    assert_eq!(exit.exit_status, 143);
    drop(out);
    pod.remove("main").await;

    // 6. A memory limit set with UpdateContainer ends in an OOM kill: 137, oom_killed, an event.
    let mut oom_events = c.oom_events().await.unwrap();
    let s = spec(
        "oom",
        &[
            "sh",
            "-c",
            "read go; x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    pod.create("oom", &s, true, false).await;
    c.start_container("oom").await.unwrap();
    c.update_container(
        "oom",
        br#"{"memory":{"limit":16777216,"swap":16777216}}"#.to_vec(),
    )
    .await
    .unwrap();
    c.write_stdin("oom", "", b"go\n".to_vec()).await.unwrap();
    let exit = pod.wait("oom", "").await;
    assert_eq!(exit.exit_status, 137);
    assert!(exit.oom_killed);
    let ev = within(30, "OOM event", oom_events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev, "oom");
    let (out, _) = pod.output("oom", "").await;
    assert!(!out.contains("survived"));
    assert!(
        c.stats_container("oom")
            .await
            .unwrap()
            .memory
            .unwrap()
            .oom_kills
            >= 1
    );
    pod.remove("oom").await;

    // 7. A read-only rootfs: writes fail, the tmpfs mounts stay writable; device rules.
    let mut s = spec(
        "ro",
        &[
            "sh",
            "-c",
            "touch /file 2>&1; echo rc=$?; touch /dev/shm/ok && echo shm-ok; \
             mknod /dev/tun2 c 10 200 || echo mknod-denied; head -c 3 /dev/zero | wc -c",
        ],
    );
    s["root"]["readonly"] = json!(true);
    let r = pod.run("ro", &s).await;
    assert_eq!(r.exit.exit_status, 0, "{r:?}");
    assert!(r.stdout.contains("Read-only file system"), "{r:?}");
    assert!(
        r.stdout.contains("rc=1") && r.stdout.contains("shm-ok"),
        "{r:?}"
    );
    // containerd's "deny all" device rule (an eBPF program on the cgroup): CAP_MKNOD is not
    // enough for a device outside the defaults, which stay usable.
    assert!(r.stdout.contains("mknod-denied\n3\n"), "{r:?}");
    assert!(r.stderr.contains("Operation not permitted"), "{r:?}");
    pod.remove("ro").await;

    // 8. A seccomp profile denying mkdir.
    let mut s = spec(
        "seccomp",
        &[
            "sh",
            "-c",
            "mkdir /tmp/d 2>&1; echo rc=$?; touch /tmp/f && echo touch-ok",
        ],
    );
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let r = pod.run("seccomp", &s).await;
    assert!(r.stdout.contains("Operation not permitted"), "{r:?}");
    assert!(
        r.stdout.contains("rc=1") && r.stdout.contains("touch-ok"),
        "{r:?}"
    );
    pod.remove("seccomp").await;

    // 9. A user namespace: root inside is host uid 100000; /sys and the cgroup fs, which the kernel
    //    will not mount for a user namespace without its own network / cgroup namespace, are bind
    //    mounts of the guest's.
    let mut s = spec(
        "userns",
        &[
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map | tr -s ' '; [ -d /sys/class ] && echo sys-ok; \
             [ -e /sys/fs/cgroup/cgroup.controllers ] && echo cgroup-ok; \
             touch /bin/x 2>&1; touch /dev/shm/y && echo shm-ok",
        ],
    );
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    let r = pod.run("userns", &s).await;
    assert_eq!(r.exit.exit_status, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "0", "{r:?}");
    assert_eq!(lines[1].trim(), "0 100000 65536", "{r:?}");
    assert_eq!(lines[2..4], ["sys-ok", "cgroup-ok"], "{r:?}");
    assert!(
        lines[4].contains("Permission denied"),
        "root-owned rootfs: {r:?}"
    );
    assert_eq!(lines[5], "shm-ok", "{r:?}");
    pod.remove("userns").await;

    // 10. Errors: unknown container, bad spec; then the VM keeps serving.
    let e = c.start_container("gone").await.unwrap_err();
    assert_eq!(code(&e), "NotFound", "{e}");
    let e = c
        .create_container(CreateContainer {
            container_id: "bad".into(),
            oci_spec_json: b"{\"ociVersion\": 1}".to_vec(),
            rootfs_path: Pod::rootfs("after"),
            ..CreateContainer::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
    let r = pod
        .run("after", &spec("after", &["echo", "still serving"]))
        .await;
    assert_eq!(
        (r.exit.exit_status, r.stdout.as_str()),
        (0, "still serving\n")
    );
    pod.remove("after").await;
    c.ping().await.unwrap();

    // 11. Storage: the share unmounts; an unknown target is NOT_FOUND.
    c.unmount_storage(SHARED).await.unwrap();
    let e = c.unmount_storage(SHARED).await.unwrap_err();
    assert_eq!(code(&e), "NotFound", "{e}");
}

#[test]
fn containers_run_in_the_guest_through_the_agent_api() {
    let a = vm_test_setup();
    husk_tests::once_more_on_nested_cpu_fault(|| run_pod_vm(&a));
}

/// One pod VM running every scenario.
fn run_pod_vm(a: &husk_tests::Artifacts) -> Result<(), VmFailure> {
    let tmp = tempfile::Builder::new()
        .prefix("husk-ctr-")
        .tempdir_in("/tmp")
        .unwrap();
    let share = tmp.path().join("share");
    for id in [
        "basic", "stdin", "tty", "main", "side", "oom", "ro", "seccomp", "userns", "after",
    ] {
        build_rootfs(&share.join(id).join("rootfs"));
    }
    let vfsd = Virtiofsd::start(tmp.path(), &share, "vfsd", "auto", false);
    let opts = VmOptions {
        vcpus: 2,
        mem_mib: 384,
        // Only for the failure report: where the vCPUs of a guest that stopped are.
        control_socket: true,
        extra_args: vec![
            "--fs".into(),
            format!("socket={},tag={TAG}", vfsd.socket.display()),
        ],
        ..VmOptions::agent(a)
    };
    let mut vm = VmProcess::spawn(a, &opts).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            // Container setup takes a while under nested emulation: generous per-call deadlines.
            let opts = ClientOptions {
                request_timeout: Duration::from_secs(60),
                retry_initial_backoff: Duration::from_millis(10),
                retry_max_backoff: Duration::from_millis(100),
                ..ClientOptions::default()
            };
            let c = vm
                .connect_agent_with(opts, Duration::from_secs(120))
                .await
                .expect("the agent answers");
            eprintln!("agent up after {:?}", started.elapsed());
            scenarios(c.clone()).await;
            eprintln!("scenarios done after {:?}", started.elapsed());
            c.shutdown().await.unwrap();
        })
    }));
    if let Err(p) = result {
        let (report, fault) = vm.post_mortem(&a.kernel);
        eprintln!("{report}\n--- virtiofsd:\n{}", vfsd.log());
        return Err((p, fault));
    }
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "husk-vmm after Shutdown: {}",
        vm.stderr()
    );
    Ok(())
}
