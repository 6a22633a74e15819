//! Terminals of container processes on the host (as root): the pty comes from
//! the container's own devpts, as under runc, for the init and for exec'd
//! processes; asserted from inside the container (`tty`, `test -t`, `stty
//! size`, the pts's owner).
//!
//! This binary runs the agent's reaper, which reaps *every* child of the test
//! process: tests here must not wait for children themselves.

mod common;

use std::sync::Arc;
use std::time::Duration;

use husk_agent::container::{stdio, CreateParams, Engine, EngineError, ExecParams};
use serde_json::{json, Value};

use common::engine;

async fn collect(mut rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = rx.recv().await {
        out.extend(chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn create(
    e: &Arc<Engine>,
    id: &str,
    spec: &Value,
    rootfs: &std::path::Path,
) -> Result<i32, EngineError> {
    let e = Arc::clone(e);
    let p = CreateParams {
        id: id.into(),
        spec_json: serde_json::to_vec(spec).unwrap(),
        rootfs: rootfs.to_path_buf(),
        stdin: false,
        terminal: true,
    };
    // A child that fails or hangs must come back as an error, not block the test.
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || e.create(p)),
    )
    .await
    .expect("CreateContainer hung")
    .unwrap()
}

/// Creates the container with a terminal, resizes it to `resize` before the start when given, starts
/// it, and returns (exit status, terminal output).
fn run_tty(
    spec: &Value,
    rootfs: &std::path::Path,
    id: &str,
    resize: Option<(u16, u16)>,
) -> (u32, String) {
    let (e, rt) = engine();
    rt.block_on(async move {
        create(&e, id, spec, rootfs).await.unwrap();
        let p = e.process(id, "").unwrap();
        assert!(p.stdio.pty.is_some(), "the init has a terminal");
        if let Some((rows, cols)) = resize {
            stdio::resize(p.stdio.pty.as_ref().unwrap(), rows, cols).unwrap();
        }
        let out = tokio::spawn(collect(
            stdio::read_stream(&p.stdio.stdout, 1024, 4).unwrap(),
        ));
        let e2 = Arc::clone(&e);
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || e2.start(&id2))
            .await
            .unwrap()
            .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(20), e.wait(id, ""))
            .await
            .expect("container did not exit")
            .unwrap();
        let out = tokio::time::timeout(Duration::from_secs(20), out)
            .await
            .expect("terminal output did not end")
            .unwrap();
        e.remove(id, false).await.unwrap();
        (exit.status, out)
    })
}

/// What the scripts print about their terminal, one `key=value` per line.
const PROBE: &str = "t=$(tty); echo tty=$t; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo is-a-tty; \
    echo fd0=$(readlink /proc/self/fd/0); echo size=$(stty size); echo pts=$(ls /dev/pts | tr '\\n' ' '); \
    echo owner=$(stat -c %u:%g $t); echo dev=$(stat -c %t:%T $t); echo console=$(stat -c %t:%T /dev/console)";

fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out:?}"))
}

/// The terminal is /dev/pts/N of the container's own devpts: the name resolves and is listed there.
fn assert_own_pts(out: &str) {
    let tty = value(out, "tty");
    let n = tty
        .strip_prefix("/dev/pts/")
        .unwrap_or_else(|| panic!("tty names the container's pts: {out:?}"));
    assert!(n.parse::<u32>().is_ok(), "{out:?}");
    assert_eq!(value(out, "fd0"), tty, "{out:?}");
    assert!(
        value(out, "pts").split(' ').any(|p| p == n),
        "/dev/pts/{n} exists in the container: {out:?}"
    );
    assert!(
        out.contains("is-a-tty\r\n"),
        "stdio is the terminal: {out:?}"
    );
}

#[test]
fn init_terminal_is_the_containers_own_pts() {
    let root = common::busybox_rootfs();
    let mut s = common::spec(&format!("{PROBE}; exit 7"));
    s["process"]["terminal"] = json!(true);
    let (status, out) = run_tty(&s, root.path(), "tty-init", Some((40, 100)));
    assert_eq!(status, 7, "exit code kept: {out:?}");
    assert_own_pts(&out);
    assert_eq!(
        value(&out, "tty"),
        "/dev/pts/0",
        "the first pts of a new devpts instance: {out:?}"
    );
    assert_eq!(
        value(&out, "size"),
        "40 100",
        "ResizePty before start: {out:?}"
    );
    // runc bind-mounts the init's pty on /dev/console.
    assert_eq!(value(&out, "console"), value(&out, "dev"), "{out:?}");
    // Root's terminal, group tty from devpts' gid=5 (oci-spec's default mount options, as runc's).
    assert_eq!(value(&out, "owner"), "0:5", "{out:?}");
}

#[test]
fn init_terminal_of_a_user_is_owned_by_the_user() {
    let root = common::busybox_rootfs();
    let mut s = common::spec(PROBE);
    s["process"]["terminal"] = json!(true);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    s["process"]["consoleSize"] = json!({"height": 30, "width": 90});
    let (status, out) = run_tty(&s, root.path(), "tty-user", None);
    assert_eq!(status, 0, "{out:?}");
    assert_own_pts(&out);
    assert_eq!(value(&out, "size"), "30 90", "process.consoleSize: {out:?}");
    assert_eq!(
        value(&out, "owner"),
        "1000:5",
        "chowned to the user, group kept: {out:?}"
    );
}

#[test]
fn exec_terminal_of_a_user_is_owned_by_the_user() {
    let root = common::busybox_rootfs();
    let (e, rt) = engine();
    let mut s = common::spec("sleep 1000");
    s["process"]["terminal"] = json!(true);
    let rootfs = root.path().to_path_buf();
    rt.block_on(async move {
        create(&e, "tty-exec", &s, &rootfs).await.unwrap();
        let e2 = Arc::clone(&e);
        tokio::task::spawn_blocking(move || e2.start("tty-exec")).await.unwrap().unwrap();
        let pj = serde_json::to_vec(&json!({"user": {"uid": 1000, "gid": 1000}, "args": ["sh", "-c", PROBE],
            "cwd": "/", "terminal": true, "env": ["PATH=/bin"], "consoleSize": {"height": 20, "width": 70}}))
        .unwrap();
        let e2 = Arc::clone(&e);
        tokio::task::spawn_blocking(move || {
            e2.exec(ExecParams { id: "tty-exec".into(), exec_id: "probe".into(), process_json: pj, stdin: false, terminal: true })
        })
        .await
        .unwrap()
        .unwrap();
        let p = e.process("tty-exec", "probe").unwrap();
        let out = collect(stdio::read_stream(&p.stdio.stdout, 1024, 4).unwrap()).await;
        assert_eq!(e.wait("tty-exec", "probe").await.unwrap().status, 0, "{out:?}");
        assert_own_pts(&out);
        // The init holds /dev/pts/0.
        assert_eq!(value(&out, "tty"), "/dev/pts/1", "{out:?}");
        assert_eq!(value(&out, "size"), "20 70", "{out:?}");
        assert_eq!(value(&out, "owner"), "1000:5", "{out:?}");
        e.remove("tty-exec", true).await.unwrap();
    });
}

#[test]
fn terminal_failure_in_the_child_is_a_clear_create_error() {
    let root = common::busybox_rootfs();
    // A devpts on /dev/pts but no /dev tmpfs: the rootfs's empty /dev has no ptmx.
    let mut s = common::spec("true");
    s["process"]["terminal"] = json!(true);
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["destination"] != "/dev");
    // Masking needs /dev/null.
    s["linux"]["maskedPaths"] = json!([]);
    assert!(s["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["type"] == "devpts"));
    std::fs::create_dir_all(root.path().join("dev/pts")).unwrap();
    let (e, rt) = engine();
    let err = rt
        .block_on(async move { create(&e, "tty-fail", &s, root.path()).await })
        .unwrap_err();
    assert!(matches!(err, EngineError::Internal(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("terminal: open /dev/ptmx") && msg.contains("No such file"),
        "{msg}"
    );
    // The id is free again.
    let (e, _) = engine();
    assert!(matches!(
        e.process("tty-fail", ""),
        Err(EngineError::NotFound(_))
    ));
}
