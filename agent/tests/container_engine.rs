//! Behavioural tests of the container engine on the host (as root): real
//! namespaces, mounts, pivot_root, users, capabilities, seccomp, rlimits,
//! with an offline busybox rootfs. Everything is asserted from inside the
//! container. Host cgroups are v1 here, so these containers get no cgroup;
//! the cgroup v2 parts are in `container_cgroup.rs`.
//!
//! This binary runs the agent's reaper, which reaps *every* child of the test
//! process: tests here must not wait for children themselves.

mod common;

use std::sync::Arc;
use std::time::Duration;

use husk_agent::container::{CreateParams, EngineError, ExecParams};
use serde_json::{json, Value};

use common::engine;

fn unique(name: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{name}-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    )
}

#[derive(Debug)]
struct Outcome {
    status: u32,
    stdout: String,
    stderr: String,
}

async fn collect(mut rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.unwrap();
        assert!(!chunk.is_empty() && chunk.len() <= husk_proto::MAX_STDIO_CHUNK);
        out.extend(chunk);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates, starts, waits, reads stdout/stderr and removes a container.
fn run(spec: &Value, rootfs: &std::path::Path) -> Outcome {
    let (e, rt) = engine();
    let id = unique("run");
    let spec_json = serde_json::to_vec(spec).unwrap();
    let rootfs = rootfs.to_path_buf();
    rt.block_on(async move {
        let e2 = Arc::clone(&e);
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || {
            e2.create(CreateParams {
                id: id2,
                spec_json,
                rootfs,
                stdin: false,
                terminal: false,
            })
        })
        .await
        .unwrap()
        .unwrap();
        let p = e.process(&id, "").unwrap();
        let out = tokio::spawn(collect(
            husk_agent::container::stdio::read_stream(
                &p.stdio.stdout,
                husk_proto::MAX_STDIO_CHUNK,
                4,
            )
            .unwrap(),
        ));
        let err = tokio::spawn(collect(
            husk_agent::container::stdio::read_stream(
                &p.stdio.stderr,
                husk_proto::MAX_STDIO_CHUNK,
                4,
            )
            .unwrap(),
        ));
        let e2 = Arc::clone(&e);
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || e2.start(&id2))
            .await
            .unwrap()
            .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(20), e.wait(&id, ""))
            .await
            .expect("container did not exit")
            .unwrap();
        assert!(exit.at_unix_nanos > 0);
        let stdout = out.await.unwrap();
        let stderr = err.await.unwrap();
        e.remove(&id, false).await.unwrap();
        Outcome {
            status: exit.status,
            stdout,
            stderr,
        }
    })
}

fn run_ok(spec: &Value, rootfs: &std::path::Path) -> String {
    let o = run(spec, rootfs);
    assert_eq!(o.status, 0, "stdout {:?} stderr {:?}", o.stdout, o.stderr);
    o.stdout
}

fn create_err(spec: &Value, rootfs: &std::path::Path, id: &str) -> EngineError {
    let (e, rt) = engine();
    let p = CreateParams {
        id: id.to_string(),
        spec_json: serde_json::to_vec(spec).unwrap(),
        rootfs: rootfs.to_path_buf(),
        stdin: false,
        terminal: false,
    };
    rt.block_on(async move {
        tokio::task::spawn_blocking(move || e.create(p))
            .await
            .unwrap()
    })
    .unwrap_err()
}

#[test]
fn user_and_supplementary_groups() {
    let root = common::busybox_rootfs();
    let mut s = common::spec("id -u; id -g; id -G; echo $HOME; umask");
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [60], "umask": 23});
    let out = run_ok(&s, root.path());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1000");
    let groups: Vec<&str> = lines[2].split_whitespace().collect();
    assert!(groups.contains(&"60"), "spec additionalGids: {groups:?}");
    assert!(
        groups.contains(&"50"),
        "/etc/group membership (staff): {groups:?}"
    );
    assert!(!groups.contains(&"10"), "not a member of wheel: {groups:?}");
    assert_eq!(lines[3], "/home/alice", "HOME from /etc/passwd");
    assert_eq!(lines[4], "0027");
}

#[test]
fn capabilities_all_five_sets() {
    let root = common::busybox_rootfs();
    let script = "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status";
    let mut s = common::spec(script);
    common::set_caps(&mut s, &["CAP_CHOWN", "CAP_NET_RAW"]);
    let out = run_ok(&s, root.path());
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            out.contains(&format!("{set}:\t0000000000002001")),
            "{set} in {out}"
        );
    }
    // A non-root user keeps exactly its ambient capabilities across exec.
    let mut s = common::spec(script);
    common::set_caps(&mut s, &["CAP_NET_RAW"]);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    let out = run_ok(&s, root.path());
    assert!(out.contains("CapEff:\t0000000000002000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000002000"), "{out}");
    // No capabilities object: nothing at all.
    let mut s = common::spec(script);
    s["process"].as_object_mut().unwrap().remove("capabilities");
    let out = run_ok(&s, root.path());
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
}

#[test]
fn readonly_root_and_readonly_paths() {
    let root = common::busybox_rootfs();
    let mut s = common::spec(
        "touch /newfile 2>&1; echo rc=$?; (echo x > /proc/sys/kernel/hostname) 2>&1; echo rc=$?; touch /tmp/ok && echo tmp-ok; hostname",
    );
    s["root"]["readonly"] = json!(true);
    let out = run_ok(&s, root.path());
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("Read-only file system"), "{out}");
    assert_eq!(lines[1], "rc=1", "{out}");
    assert!(
        lines[2].contains("Read-only file system"),
        "/proc/sys is read-only: {out}"
    );
    assert_eq!(lines[3], "rc=1", "{out}");
    assert_eq!(lines[4], "tmp-ok", "{out}");
    assert_eq!(lines[5], "husk-test", "{out}");
    assert!(!root.path().join("newfile").exists());
}

#[test]
fn rlimit_nofile() {
    let root = common::busybox_rootfs();
    let mut s = common::spec("ulimit -n; ulimit -Hn");
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 1234, "hard": 2345}]);
    assert_eq!(run_ok(&s, root.path()), "1234\n2345\n");
}

#[test]
fn seccomp_profile_denies_mkdir() {
    let root = common::busybox_rootfs();
    let mut s = common::spec("mkdir /tmp/denied; echo rc=$?; touch /tmp/allowed && echo touch-ok");
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let o = run(&s, root.path());
    assert_eq!(o.status, 0, "{} {}", o.stdout, o.stderr);
    assert!(o.stderr.contains("Operation not permitted"), "{}", o.stderr);
    assert_eq!(o.stdout, "rc=1\ntouch-ok\n");
    // Without no_new_privileges the filter is installed while privileged.
    s["process"]["noNewPrivileges"] = json!(false);
    let o = run(&s, root.path());
    assert_eq!(o.stdout, "rc=1\ntouch-ok\n", "{}", o.stderr);
    // An allow-list profile (default ERRNO) that allows what sh needs.
    let mut s = common::spec("exit 0");
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["execve","exit_group","exit","brk","arch_prctl","set_tid_address","set_robust_list",
                   "rseq","prlimit64","mmap","munmap","mprotect","getuid","geteuid","getgid","getegid",
                   "getpid","getppid","rt_sigaction","rt_sigprocmask","rt_sigreturn","uname","read",
                   "write","close","fcntl","ioctl","stat","fstat","newfstatat","getcwd","readlink",
                   "access","openat","open","lseek","getrandom","statx","wait4","dup2","geteuid"],
         "action": "SCMP_ACT_ALLOW"}]});
    let o = run(&s, root.path());
    assert_eq!(o.status, 0, "{} {}", o.stdout, o.stderr);
}

#[test]
fn hostname_env_cwd() {
    let root = common::busybox_rootfs();
    let mut s = common::spec("hostname; echo \"$FOO|$BAR\"; pwd");
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz", "BAR="]);
    s["process"]["cwd"] = json!("/work");
    assert_eq!(run_ok(&s, root.path()), "husk-test\nbar baz|\n/work\n");
    // A cwd that does not exist yet is an error of its own step.
    let mut s = common::spec("true");
    s["process"]["cwd"] = json!("/does/not/exist");
    let e = create_err(&s, root.path(), "badcwd");
    assert!(e.to_string().contains("Cwd"), "{e}");
}

#[test]
fn masked_paths() {
    let root = common::busybox_rootfs();
    // This host's kernel has no /proc/kcore (CONFIG_PROC_KCORE off): a
    // masked path that does not exist is skipped, as the OCI spec says. The
    // test host's kernel decides; both outcomes are asserted precisely.
    let kcore = std::path::Path::new("/proc/kcore").exists();
    let mut s = common::spec(
        "echo kcore=$(wc -c < /proc/kcore); echo timer_list=$(wc -c < /proc/timer_list); echo firmware=$(ls -A /sys/firmware | wc -l); echo pid1=$(cat /proc/1/comm)",
    );
    s["linux"]["maskedPaths"]
        .as_array_mut()
        .unwrap()
        .push(json!("/proc/timer_list"));
    let o = run(&s, root.path());
    assert_eq!(o.status, 0, "{}", o.stderr);
    let out = o.stdout;
    if kcore {
        assert!(
            out.contains("kcore=0\n"),
            "kcore is /dev/null: {out} {}",
            o.stderr
        );
    } else {
        assert!(o.stderr.contains("can't open /proc/kcore"), "{}", o.stderr);
    }
    assert!(
        out.contains("timer_list=0\n"),
        "timer_list is /dev/null: {out} {}",
        o.stderr
    );
    assert!(
        out.contains("firmware=0\n"),
        "/sys/firmware is an empty tmpfs: {out}"
    );
    assert!(
        out.contains("pid1=sh\n"),
        "own pid namespace, sh is pid 1: {out}"
    );
}

#[test]
fn exit_code_and_signal_death() {
    let root = common::busybox_rootfs();
    assert_eq!(run(&common::spec("exit 3"), root.path()).status, 3);
    // Without a pid namespace sh is not an init and dies of its own SIGKILL.
    let mut s = common::spec("kill -9 $$");
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|n| n["type"] != "pid");
    assert_eq!(run(&s, root.path()).status, 137);
    // As pid 1 of its namespace, signals from inside without a handler
    // (even SIGKILL) are ignored.
    assert_eq!(
        run(
            &common::spec("kill -9 $$; kill -15 $$; exit 4"),
            root.path()
        )
        .status,
        4
    );
}

#[test]
fn exec_stdin_and_signals() {
    let root = common::busybox_rootfs();
    let (e, rt) = engine();
    let spec = serde_json::to_vec(&common::spec("sleep 1000")).unwrap();
    let rootfs = root.path().to_path_buf();
    rt.block_on(async move {
        let e2 = Arc::clone(&e);
        tokio::task::spawn_blocking(move || {
            e2.create(CreateParams { id: "execs".into(), spec_json: spec, rootfs, stdin: false, terminal: false })
        })
        .await
        .unwrap()
        .unwrap();
        // Exec before start: refused.
        let e2 = Arc::clone(&e);
        let proc_json = |args: Value, terminal: bool| {
            serde_json::to_vec(&json!({"user": {"uid": 0, "gid": 0}, "args": args, "cwd": "/", "terminal": terminal,
                "env": ["PATH=/bin"]})).unwrap()
        };
        let pj = proc_json(json!(["true"]), false);
        let err = tokio::task::spawn_blocking(move || {
            e2.exec(ExecParams { id: "execs".into(), exec_id: "early".into(), process_json: pj, stdin: false, terminal: false })
        })
        .await
        .unwrap()
        .unwrap_err();
        assert!(matches!(err, EngineError::FailedPrecondition(_)), "{err}");
        let e2 = Arc::clone(&e);
        tokio::task::spawn_blocking(move || e2.start("execs")).await.unwrap().unwrap();

        // cat with stdin: what we write comes back.
        let e2 = Arc::clone(&e);
        let pj = proc_json(json!(["sh", "-c", "cat; cat /proc/1/comm; hostname"]), false);
        tokio::task::spawn_blocking(move || {
            e2.exec(ExecParams { id: "execs".into(), exec_id: "cat".into(), process_json: pj, stdin: true, terminal: false })
        })
        .await
        .unwrap()
        .unwrap();
        let p = e.process("execs", "cat").unwrap();
        let out = tokio::spawn(collect(husk_agent::container::stdio::read_stream(&p.stdio.stdout, 1024, 2).unwrap()));
        assert_eq!(p.stdio.stdin.write(b"hello\n").await.unwrap(), 6);
        p.stdio.stdin.close().await;
        let exit = e.wait("execs", "cat").await.unwrap();
        assert_eq!(exit.status, 0);
        assert_eq!(out.await.unwrap(), "hello\nsleep\nhusk-test\n", "joined the pid and uts namespaces");

        // A terminal.
        let e2 = Arc::clone(&e);
        let pj = proc_json(json!(["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty"]), true);
        tokio::task::spawn_blocking(move || {
            e2.exec(ExecParams { id: "execs".into(), exec_id: "tty".into(), process_json: pj, stdin: false, terminal: false })
        })
        .await
        .unwrap()
        .unwrap();
        let p = e.process("execs", "tty").unwrap();
        let out = collect(husk_agent::container::stdio::read_stream(&p.stdio.stdout, 1024, 2).unwrap()).await;
        assert!(out.contains("is-a-tty"), "{out:?}");
        assert_eq!(e.wait("execs", "tty").await.unwrap().status, 0);

        // Exec of a missing binary fails with the errno.
        let e2 = Arc::clone(&e);
        let pj = proc_json(json!(["/nope"]), false);
        let err = tokio::task::spawn_blocking(move || {
            e2.exec(ExecParams { id: "execs".into(), exec_id: "nope".into(), process_json: pj, stdin: false, terminal: false })
        })
        .await
        .unwrap()
        .unwrap_err();
        assert!(err.to_string().contains("No such file"), "{err}");

        // List, then SIGKILL init: 137.
        let (procs, pids) = e.list("execs", 100).unwrap();
        assert_eq!(procs[0].exec_id, "");
        assert!(procs.iter().any(|p| p.exec_id == "cat" && p.exit.is_some()));
        assert!(pids.contains(&procs[0].pid));
        assert!(matches!(e.remove("execs", false).await, Err(EngineError::FailedPrecondition(_))));
        e.signal("execs", "", 9, false).unwrap();
        assert_eq!(e.wait("execs", "").await.unwrap().status, 137);
        assert!(matches!(e.signal("execs", "", 9, false), Err(EngineError::NotFound(_))));
        e.remove("execs", false).await.unwrap();
        assert!(matches!(e.process("execs", ""), Err(EngineError::NotFound(_))));
    });
}

#[test]
fn start_of_missing_binary_fails() {
    let root = common::busybox_rootfs();
    let (e, rt) = engine();
    let mut s = common::spec("x");
    s["process"]["args"] = json!(["/bin/does-not-exist"]);
    let spec = serde_json::to_vec(&s).unwrap();
    let rootfs = root.path().to_path_buf();
    rt.block_on(async move {
        let e2 = Arc::clone(&e);
        tokio::task::spawn_blocking(move || {
            e2.create(CreateParams {
                id: "nobin".into(),
                spec_json: spec,
                rootfs,
                stdin: false,
                terminal: false,
            })
        })
        .await
        .unwrap()
        .unwrap();
        let e2 = Arc::clone(&e);
        let err = tokio::task::spawn_blocking(move || e2.start("nobin"))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, EngineError::FailedPrecondition(_)), "{err}");
        assert!(
            err.to_string().contains("No such file or directory"),
            "{err}"
        );
        assert_eq!(e.wait("nobin", "").await.unwrap().status, 127);
        e.remove("nobin", false).await.unwrap();
    });
}

#[test]
fn remove_force_of_created_container() {
    let root = common::busybox_rootfs();
    let (e, rt) = engine();
    let spec = serde_json::to_vec(&common::spec("sleep 1000")).unwrap();
    let rootfs = root.path().to_path_buf();
    rt.block_on(async move {
        let e2 = Arc::clone(&e);
        tokio::task::spawn_blocking(move || {
            e2.create(CreateParams {
                id: "created".into(),
                spec_json: spec,
                rootfs,
                stdin: false,
                terminal: false,
            })
        })
        .await
        .unwrap()
        .unwrap();
        e.remove("created", true).await.unwrap();
    });
}

#[test]
fn invalid_specs_name_the_field() {
    let root = common::busybox_rootfs();
    let mut s = common::spec("true");
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]);
    let e = create_err(&s, root.path(), "bad1");
    assert!(matches!(e, EngineError::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("process.rlimits[0].soft"), "{e}");
    let mut s = common::spec("true");
    s["mounts"][0]["destination"] = json!("relative");
    assert!(create_err(&s, root.path(), "bad2")
        .to_string()
        .contains("mounts[0].destination"));
    let e = create_err(&common::spec("true"), root.path(), "bad/id");
    assert!(e.to_string().contains("container_id"), "{e}");
    let e = create_err(
        &common::spec("true"),
        std::path::Path::new("/nonexistent-root"),
        "bad3",
    );
    assert!(e.to_string().contains("rootfs_path"), "{e}");
    let mut s = common::spec("true");
    s["linux"]["resources"] = json!({"memory": {"limit": 1000000}});
    let e = create_err(&s, root.path(), "bad4");
    assert!(
        matches!(e, EngineError::FailedPrecondition(_)),
        "no cgroup v2 here: {e}"
    );
}

#[test]
fn user_namespace_maps_ids() {
    let root = common::busybox_rootfs();
    // The container's root is host uid/gid 100000: it may write only where
    // that id may.
    let work = root.path().join("work");
    std::os::unix::fs::chown(&work, Some(100_000), Some(100_000)).unwrap();
    let mut s = common::spec(
        "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; touch /work/mine; \
         touch /bin/not-mine 2>&1; grep CapEff /proc/self/status; echo $(cat /proc/1/comm)",
    );
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    common::set_caps(&mut s, &["CAP_CHOWN", "CAP_NET_RAW"]);
    let o = run(&s, root.path());
    assert_eq!(o.status, 0, "stdout {:?} stderr {:?}", o.stdout, o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0..2], ["0", "0"], "{o:?}");
    let maps: Vec<Vec<&str>> = lines[2..4]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(maps, [["0", "100000", "65536"], ["0", "100000", "65536"]]);
    assert!(lines[4].contains("Permission denied"), "{o:?}");
    assert_eq!(lines[5], "CapEff:\t0000000000002001", "{o:?}");
    assert_eq!(lines[6], "sh", "{o:?}");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(work.join("mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (100_000, 100_000));

    // Mappings without a new user namespace, and bad mappings, are refused.
    let mut s = common::spec("true");
    s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 1}]);
    let e = create_err(&s, root.path(), "userns1");
    assert!(e.to_string().starts_with("linux.uidMappings:"), "{e}");
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    let e = create_err(&s, root.path(), "userns2");
    assert!(e.to_string().starts_with("linux.gidMappings:"), "{e}");
    s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 4294967295u64, "size": 2}]);
    let e = create_err(&s, root.path(), "userns3");
    assert!(e.to_string().starts_with("linux.gidMappings[0]:"), "{e}");
}

#[test]
fn sysctls_apply_in_the_containers_namespaces() {
    let root = common::busybox_rootfs();
    let host = |k: &str| std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap();
    let (forward, msgmax, rmid) = (
        host("net/ipv4/ip_forward"),
        host("kernel/msgmax"),
        host("kernel/shm_rmid_forced"),
    );
    let want_forward = if forward.trim() == "1" { "0" } else { "1" };
    let want_rmid = if rmid.trim() == "1" { "0" } else { "1" };
    let mut s = common::spec(
        "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/msgmax /proc/sys/kernel/shm_rmid_forced",
    );
    s["linux"]["sysctl"] = json!({
        "net.ipv4.ip_forward": want_forward,
        "kernel.msgmax": "12345",
        "kernel.shm_rmid_forced": want_rmid,
    });
    assert_eq!(
        run_ok(&s, root.path()),
        format!("{want_forward}\n12345\n{want_rmid}\n")
    );
    // The container's own net and ipc namespaces: the host's values stay.
    assert_eq!(host("net/ipv4/ip_forward"), forward);
    assert_eq!(host("kernel/msgmax"), msgmax);
    assert_eq!(host("kernel/shm_rmid_forced"), rmid);
}

#[test]
fn oom_score_adj_is_set() {
    let root = common::busybox_rootfs();
    let mut s = common::spec("cat /proc/self/oom_score_adj; cat /proc/1/oom_score_adj");
    s["process"]["oomScoreAdj"] = json!(123);
    assert_eq!(run_ok(&s, root.path()), "123\n123\n");
    // Lowering below the agent's own value needs CAP_SYS_RESOURCE, which the
    // guest's agent has and a sandboxed test host may not.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:\t"))
        .map(|h| u64::from_str_radix(h, 16).unwrap())
        .unwrap();
    if cap_eff & (1 << 24) != 0 {
        // 24: CAP_SYS_RESOURCE.
        let mut s = common::spec("cat /proc/self/oom_score_adj");
        s["process"]["oomScoreAdj"] = json!(-7);
        assert_eq!(run_ok(&s, root.path()), "-7\n");
    }
}

#[test]
fn no_new_privileges_flag() {
    let root = common::busybox_rootfs();
    let mut s = common::spec("grep NoNewPrivs /proc/self/status");
    s["process"]["noNewPrivileges"] = json!(true);
    assert_eq!(run_ok(&s, root.path()), "NoNewPrivs:\t1\n");
    s["process"]["noNewPrivileges"] = json!(false);
    assert_eq!(run_ok(&s, root.path()), "NoNewPrivs:\t0\n");
}
