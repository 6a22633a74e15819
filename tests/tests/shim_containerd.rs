//! End to end: containerd 1.6 (Debian), started by the test with its own root, state and socket, runs
//! containers through `containerd-shim-husk-v2` in Husk microVMs. Runs in the nested test host (KVM,
//! containerd, root): `make e2e`.
//!
//! Every scenario checks what a user of `ctr` sees, then that nothing was left behind (processes, mounts,
//! /run/husk, shim sockets).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::containerd::{
    busybox_image_tar, husk_shim_config, Containerd, ContainerdOptions, LeakSnapshot, Stdin,
};
use husk_tests::{project_root, vm_test_setup, Artifacts};

const NS: &str = "husk-e2e";
const IMAGE: &str = "docker.io/library/busybox:latest";
const RUNTIME: &str = "io.containerd.husk.v2";
const GUEST_KERNEL_RELEASE: &str = "6.1.192-husk";

/// A private containerd whose PATH finds the shim in target/release, with a Husk config pointing at the
/// project's guest kernel, image, VMM and virtiofsd; the busybox image imported.
struct Setup {
    ctd: Containerd,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let a: Artifacts = vm_test_setup();
    let root = project_root();
    let dir = tempfile::tempdir().unwrap();
    let config = husk_shim_config(dir.path(), &a).unwrap_or_else(|e| panic!("{e}"));
    let opts = ContainerdOptions {
        extra_path: vec![root.join("target/release")],
        env: vec![("HUSK_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    };
    let ctd = Containerd::start(&opts).unwrap_or_else(|e| panic!("{e}"));
    ctd.import_image(NS, &busybox_image_tar().unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"));
    Setup { ctd, _dir: dir }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Setup {
    fn ctr(&self, args: &[&str]) -> std::process::Output {
        self.ctd.ctr(NS, args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        text(
            &self
                .ctd
                .ctr_ok(NS, args)
                .unwrap_or_else(|e| panic!("{e}"))
                .stdout,
        )
    }

    /// `ctr tasks ls` status column for `id` (None if the task is not listed).
    fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr(&["tasks", "ls"]);
        text(&out.stdout).lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(2).unwrap_or(&"").to_string())
        })
    }

    fn wait_status(&self, id: &str, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.task_status(id);
            if s.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id}: status {s:?}, wanted {want}; containerd log:\n{}",
                self.ctd.log_tail(60)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `ctr run` attached, in the background (for scenarios that act on the running container).
    fn spawn_run(&self, args: &[&str]) -> std::process::Child {
        Command::new("ctr")
            .arg("-a")
            .arg(self.ctd.address())
            .args(["-n", NS, "run", "--runtime", RUNTIME])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn assert_no_leaks(&self, before: &LeakSnapshot) {
        let leaks = LeakSnapshot::wait_for_no_leaks(before, Duration::from_secs(30));
        assert!(
            leaks.is_empty(),
            "left behind:\n{}\ncontainerd log:\n{}",
            leaks.join("\n"),
            self.ctd.log_tail(60)
        );
    }
}

fn wait_child(child: &mut std::process::Child, timeout: Duration) -> (Option<i32>, String, String) {
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ctr run did not finish in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.code(), out, err)
}

#[test]
fn run_rm_exit_code_env_cwd_stdin_and_config_errors() {
    let s = setup();
    // A host directory bind-mounted read-only (a volume): it reaches the guest through the pod's share.
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("hello"), "from-the-host\n").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        volume.path().display()
    );
    let before = LeakSnapshot::take();
    let started = Instant::now();
    let out = s
        .ctd
        .ctr_with(
            NS,
            [
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                "--env",
                "FOO=bar",
                "--cwd",
                "/tmp",
                "--mount",
                &mount,
                IMAGE,
                "s1",
                "sh",
                "-c",
                "read line; echo in=$line; echo foo=$FOO; pwd; id -u; uname -r; cat /data/hello; \
                 touch /data/new 2>/dev/null && echo volume-rw || echo volume-ro; \
                 echo \"cmdline $(cat /proc/cmdline)\"; echo erofs $(ls /sys/fs/erofs); \
                 echo \"vda $(cat /sys/block/vda/serial) ro=$(cat /sys/block/vda/ro)\"; exit 3",
            ],
            Some(Stdin::for_run(b"hello\n", "s1")),
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = text(&out.stdout);
    eprintln!("ctr run --rm took {:?}", started.elapsed());
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout: {stdout}\nstderr: {}\ncontainerd log:\n{}",
        text(&out.stderr),
        s.ctd.log_tail(80)
    );
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    for want in [
        "in=hello",
        "foo=bar",
        "/tmp",
        "0",
        GUEST_KERNEL_RELEASE,
        "from-the-host",
        "volume-ro",
    ] {
        assert!(lines.contains(&want), "{want:?} missing from {lines:?}");
    }
    // The pod VM booted from the read-only erofs root: the kernel was told root=/dev/vda (no initrd),
    // an erofs is mounted from vda, and vda is the VMM's read-only root disk.
    let field = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} line in {lines:?}"))
    };
    let cmdline = field("cmdline ");
    assert!(
        cmdline.contains("root=/dev/vda ro rootfstype=erofs"),
        "guest cmdline: {cmdline}"
    );
    assert!(
        field("erofs ").split_whitespace().any(|d| d == "vda"),
        "/sys/fs/erofs: {lines:?}"
    );
    assert_eq!(field("vda "), "husk-rootfs ro=1");
    let host_release = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    assert_ne!(
        host_release.trim(),
        GUEST_KERNEL_RELEASE,
        "the guest kernel must not be the host's"
    );
    s.assert_no_leaks(&before);

    // A bad annotation is refused with a clear error through containerd, and leaves nothing behind.
    for (annotation, needle) in [
        ("io.husk.config.vcpus=999", "vcpus"),
        ("io.husk.config.kernel=/boot/evil", "not allowed"),
    ] {
        let out = s.ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--annotation",
            annotation,
            IMAGE,
            "bad",
            "true",
        ]);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{annotation}: {err}"
        );
        let _ = s.ctr(&["containers", "rm", "bad"]);
    }
    s.assert_no_leaks(&before);
}

#[test]
fn exec_user_tty_pause_resume_stats_and_sigterm() {
    let s = setup();
    let before = LeakSnapshot::take();
    let mut run = s.spawn_run(&[
        "--rm",
        IMAGE,
        "d1",
        "sh",
        "-c",
        "trap 'exit 143' TERM; echo ready; while true; do sleep 1; done",
    ]);
    s.wait_status("d1", "RUNNING", Duration::from_secs(180));

    // exec: exit code, stdout and stderr apart.
    let out = s.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "d1",
        "sh",
        "-c",
        "echo exec-out; echo exec-err >&2; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(text(&out.stdout).trim(), "exec-out");
    assert!(text(&out.stderr).contains("exec-err"), "{out:?}");

    // exec with stdin piped through.
    let out = s
        .ctd
        .ctr_with(
            NS,
            ["tasks", "exec", "--exec-id", "e2", "d1", "cat"],
            Some(Stdin::for_exec(b"piped-through\n", "d1", "e2")),
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "piped-through", "{out:?}");

    // exec as another user (uid and groups from the image's /etc/passwd and /etc/group).
    let id = s.ctr_ok(&[
        "tasks",
        "exec",
        "--user",
        "1000",
        "--exec-id",
        "e4",
        "d1",
        "id",
    ]);
    assert!(id.starts_with("uid=1000"), "{id}");

    // exec with a terminal (ctr needs one itself: script(1) provides it).
    let ctr_cmd = format!(
        "ctr -a {} -n {NS} tasks exec -t --exec-id e3 d1 sh -c 'tty; stty size'",
        s.ctd.address().display()
    );
    let out = Command::new("script")
        .args(["-qec", &ctr_cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let tty = text(&out.stdout);
    // The terminal is the container's own (`tty` names it) and has the size ctr set through ResizePty.
    assert!(
        tty.contains("/dev/pts/") && tty.contains("24 80"),
        "tty exec printed: {tty:?}"
    );

    // ps lists the init and nothing else once the execs are gone.
    let ps = s.ctr_ok(&["tasks", "ps", "d1"]);
    assert!(ps.lines().count() >= 2, "{ps}");

    // pause / resume.
    s.ctr_ok(&["tasks", "pause", "d1"]);
    s.wait_status("d1", "PAUSED", Duration::from_secs(30));
    s.ctr_ok(&["tasks", "resume", "d1"]);
    s.wait_status("d1", "RUNNING", Duration::from_secs(30));

    // stats from the guest's cgroup.
    let metrics = s.ctr_ok(&["tasks", "metrics", "d1"]);
    assert!(
        metrics.contains("memory.usage") && metrics.contains("pids.current"),
        "{metrics}"
    );

    // SIGTERM reaches the container's init: exit status 143 through `ctr run`.
    s.ctr_ok(&["tasks", "kill", "-s", "SIGTERM", "d1"]);
    let (code, out, err) = wait_child(&mut run, Duration::from_secs(60));
    assert_eq!(code, Some(143), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("ready"), "{out}");
    s.assert_no_leaks(&before);
}

#[test]
fn two_containers_in_one_pod() {
    let s = setup();
    let before = LeakSnapshot::take();
    let pod = ["--annotation", "io.kubernetes.cri.sandbox-id=pod1"];
    s.ctr_ok(
        &[
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                "--annotation",
                "io.kubernetes.cri.container-type=sandbox",
            ][..],
            &pod[..],
            &[IMAGE, "pod1", "sleep", "1000"][..],
        ]
        .concat(),
    );
    s.ctr_ok(
        &[
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                "--annotation",
                "io.kubernetes.cri.container-type=container",
            ][..],
            &pod[..],
            &[IMAGE, "app1", "sleep", "1000"][..],
        ]
        .concat(),
    );
    s.wait_status("app1", "RUNNING", Duration::from_secs(60));
    let now = LeakSnapshot::take();
    assert_eq!(
        now.count("husk-vmm"),
        before.count("husk-vmm") + 1,
        "two containers of one pod must share one VM: {:?}",
        now.processes
    );
    let boot_id = |c: &str, e: &str| {
        s.ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            e,
            c,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])
        .trim()
        .to_string()
    };
    assert_eq!(boot_id("pod1", "b1"), boot_id("app1", "b2"));

    // Remove one container: the pod keeps running.
    s.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "app1"]);
    s.wait_status("app1", "STOPPED", Duration::from_secs(60));
    s.ctr_ok(&["tasks", "rm", "app1"]);
    s.ctr_ok(&["containers", "rm", "app1"]);
    assert_eq!(
        s.ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            "after",
            "pod1",
            "echo",
            "alive"
        ])
        .trim(),
        "alive"
    );

    // Kill with `all`: every process of the container.
    s.ctr_ok(&["tasks", "kill", "--all", "-s", "SIGKILL", "pod1"]);
    s.wait_status("pod1", "STOPPED", Duration::from_secs(60));
    s.ctr_ok(&["tasks", "rm", "pod1"]);
    s.ctr_ok(&["containers", "rm", "pod1"]);
    s.assert_no_leaks(&before);
}

/// The pid of the one process named `name` that `after` has and `before` had not.
fn new_pid(before: &LeakSnapshot, after: &LeakSnapshot, name: &str) -> u32 {
    let old = before.processes.get(name).cloned().unwrap_or_default();
    let new: Vec<u32> = after.processes[name]
        .iter()
        .copied()
        .filter(|p| !old.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "{name}: new pids {new:?}");
    new[0]
}

#[test]
fn kill_9_of_shim_or_vmm_ends_the_task_and_leaks_nothing() {
    let s = setup();
    for (id, victim) in [("k1", "containerd-shim-husk-v2"), ("k2", "husk-vmm")] {
        let before = LeakSnapshot::take();
        s.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            id,
            "sleep",
            "1000",
        ]);
        s.wait_status(id, "RUNNING", Duration::from_secs(60));
        let pid = new_pid(&before, &LeakSnapshot::take(), victim);
        let killed = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success(), "kill -9 {pid} ({victim})");
        // containerd sees the task end (the shim reports a dead VM; a dead shim is cleaned up by containerd).
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.task_status(id).as_deref() == Some("RUNNING") {
            assert!(
                Instant::now() < deadline,
                "{id}: still RUNNING after kill -9 of {victim}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = s.ctr(&["tasks", "rm", "-f", id]);
        s.ctr_ok(&["containers", "rm", id]);
        s.assert_no_leaks(&before);
    }
}

/// Runs `ip ARGS` (in L1's root network namespace), panicking with its stderr.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Deletes the test's network namespace and the host end of its veth, however the test ends.
struct PodNetns {
    name: String,
    host_end: String,
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_end])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn pod_network_from_a_network_namespace() {
    let s = setup();
    // What CNI's bridge/ptp plugins leave: a veth whose pod end is eth0 with the pod IP and a default
    // route; its host end is the gateway.
    let ns = PodNetns {
        name: format!("husk-e2e-{}", std::process::id()),
        host_end: format!("hve{}", std::process::id() % 100_000),
    };
    ip(&["netns", "add", &ns.name]);
    ip(&[
        "link",
        "add",
        &ns.host_end,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &ns.name,
    ]);
    ip(&["addr", "add", "10.88.7.1/24", "dev", &ns.host_end]);
    ip(&["link", "set", &ns.host_end, "up"]);
    for cmd in [
        "ip link set lo up",
        "ip link set eth0 mtu 1400 up",
        "ip addr add 10.88.7.2/24 dev eth0",
        "ip route add default via 10.88.7.1",
    ] {
        let mut args = vec!["netns", "exec", &ns.name];
        args.extend(cmd.split(' '));
        ip(&args);
    }
    let pod_mac = ip(&[
        "netns",
        "exec",
        &ns.name,
        "cat",
        "/sys/class/net/eth0/address",
    ]);
    let netns_path = format!("/run/netns/{}", ns.name);
    let with_ns = format!("network:{netns_path}");

    // Outbound: the container reaches a server on the host end through the VM's interface.
    let listener = std::net::TcpListener::bind("10.88.7.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut got = [0u8; 6];
        conn.read_exact(&mut got).unwrap();
        std::io::Write::write_all(&mut conn, b"pong\n").unwrap();
        (peer.ip().to_string(), got)
    });
    let before = LeakSnapshot::take();
    let script = format!(
        "ip addr show eth0; ip route; cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; \
         ping -c 1 -W 10 10.88.7.1 >/dev/null && echo ping-ok; echo hello | nc -w 10 10.88.7.1 {port}"
    );
    let out = s.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &with_ns,
        IMAGE,
        "n1",
        "sh",
        "-c",
        &script,
    ]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}\ncontainerd log:\n{}",
        text(&out.stderr),
        s.ctd.log_tail(80)
    );
    for want in [
        "inet 10.88.7.2/24",
        "default via 10.88.7.1 dev eth0",
        pod_mac.trim(),
        "1400",
        "ping-ok",
        "pong",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
    let (peer, got) = server.join().unwrap();
    assert_eq!(peer, "10.88.7.2", "the connection comes from the pod IP");
    assert_eq!(&got, b"hello\n");
    s.assert_no_leaks(&before);
    let qdiscs = ip(&[
        "netns", "exec", &ns.name, "tc", "qdisc", "show", "dev", "eth0",
    ]);
    assert!(
        !qdiscs.contains("ingress"),
        "redirect left on eth0: {qdiscs}"
    );
    let links = ip(&["netns", "exec", &ns.name, "ip", "-o", "link"]);
    assert!(!links.contains("_husk"), "tap left behind: {links}");

    // Inbound: a server in the container answers a client on the host, at the pod IP.
    let mut server = s.spawn_run(&[
        "--rm",
        "--with-ns",
        &with_ns,
        IMAGE,
        "n2",
        "sh",
        "-c",
        "echo served | nc -l -p 8080",
    ]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let reply = loop {
        if let Ok(mut c) = std::net::TcpStream::connect_timeout(
            &"10.88.7.2:8080".parse().unwrap(),
            Duration::from_secs(2),
        ) {
            let mut r = String::new();
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = c.read_to_string(&mut r);
            if !r.is_empty() {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no answer from 10.88.7.2:8080; containerd log:\n{}",
            s.ctd.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(reply.trim(), "served");
    let (code, _, err) = wait_child(&mut server, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    s.assert_no_leaks(&before);
}
