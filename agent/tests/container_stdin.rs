//! Stdin of container processes on the host (as root): writes to processes
//! that do not read wait on the reactor, not on threads; CloseStdin aborts
//! them and the process sees EOF right after the bytes reported written;
//! a terminal's master serves stdin and stdout at once.
//!
//! The runtime is built like the agent's (2 workers, at most 16 blocking
//! threads), so writes that held a blocking thread each would starve the
//! engine's own blocking work (create / exec) here as they did in the agent.
//! This binary runs the agent's reaper: tests must not wait for children.

mod common;

use std::sync::Arc;
use std::time::Duration;

use husk_agent::container::stdio::{read_stream, StdinError};
use husk_agent::container::{CreateParams, Engine, ExecParams};
use serde_json::{json, Value};

/// One MiB: the largest WriteStdin, 16 times a pipe's default capacity.
const BIG: usize = husk_proto::MAX_STDIN_CHUNK;
/// More pending writes than the agent has blocking threads.
const STALLED: usize = 20;

use common::engine;

fn process_json(script: &str, terminal: bool) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", script],
        "cwd": "/", "terminal": terminal, "env": ["PATH=/bin"]}),
    )
    .unwrap()
}

/// Engine calls that block run on the blocking pool, as in the service; a
/// starved pool shows up as this timing out.
async fn create(e: &Arc<Engine>, id: &str, spec: Value, rootfs: &std::path::Path, stdin: bool) {
    let e2 = Arc::clone(e);
    let p = CreateParams {
        id: id.into(),
        spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs: rootfs.to_path_buf(),
        stdin,
        terminal: false,
    };
    let create = tokio::task::spawn_blocking(move || e2.create(p));
    tokio::time::timeout(Duration::from_secs(20), create)
        .await
        .unwrap_or_else(|_| panic!("create {id}: timed out (blocking pool starved?)"))
        .unwrap()
        .unwrap();
    let e2 = Arc::clone(e);
    let id2 = id.to_string();
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || e2.start(&id2)),
    )
    .await
    .unwrap_or_else(|_| panic!("start {id}: timed out"))
    .unwrap()
    .unwrap();
}

async fn exec(e: &Arc<Engine>, id: &str, exec_id: &str, script: &str, terminal: bool) {
    let e2 = Arc::clone(e);
    let p = ExecParams {
        id: id.into(),
        exec_id: exec_id.into(),
        process_json: process_json(script, terminal),
        stdin: true,
        terminal,
    };
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || e2.exec(p)),
    )
    .await
    .unwrap_or_else(|_| panic!("exec {id}/{exec_id}: timed out (blocking pool starved?)"))
    .unwrap()
    .unwrap();
}

/// All of a stream, as text.
async fn collect(mut rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = rx.recv().await {
        out.extend(chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads `rx` until the output contains `marker`; returns what was read.
async fn read_until(
    rx: &mut tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    marker: &str,
) -> String {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(marker) {
        let chunk = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {marker:?} in {:?}", String::from_utf8_lossy(&out)))
            .unwrap_or_else(|| panic!("EOF before {marker:?}"));
        out.extend(chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn pending_writes_hold_no_thread_and_close_aborts_them() {
    let root = common::busybox_rootfs();
    let rootfs = root.path().to_path_buf();
    let go = rootfs.join("work/go");
    let (e, rt) = engine();
    rt.block_on(async move {
        create(&e, "stall", common::spec("sleep 1000"), &rootfs, false).await;
        // Each exec reads nothing until /work/go exists, then counts its
        // stdin up to EOF: what it prints is what reached it.
        let script = "while [ ! -e /work/go ]; do sleep 0.05; done; wc -c";
        let mut outputs = Vec::new();
        for i in 0..STALLED {
            exec(&e, "stall", &format!("w{i}"), script, false).await;
            let p = e.process("stall", &format!("w{i}")).unwrap();
            outputs.push(tokio::spawn(collect(
                read_stream(&p.stdio.stdout, 4096, 2).unwrap(),
            )));
        }
        let data = Arc::new(vec![b'x'; BIG]);
        let mut writes = Vec::new();
        for i in 0..STALLED {
            let p = e.process("stall", &format!("w{i}")).unwrap();
            let d = Arc::clone(&data);
            writes.push(tokio::spawn(async move { p.stdio.stdin.write(&d).await }));
        }
        // A second write to w0 queues behind the first.
        let p0 = e.process("stall", "w0").unwrap();
        let queued = tokio::spawn(async move { p0.stdio.stdin.write(b"queued").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            writes.iter().all(|w| !w.is_finished()),
            "writes to full pipes wait"
        );
        assert!(!queued.is_finished());

        // Meanwhile another container is created, runs, and gets its stdin.
        create(
            &e,
            "other",
            common::spec("read line; echo got:$line"),
            &rootfs,
            true,
        )
        .await;
        let p = e.process("other", "").unwrap();
        let out = tokio::spawn(collect(read_stream(&p.stdio.stdout, 4096, 2).unwrap()));
        let n = tokio::time::timeout(Duration::from_secs(10), p.stdio.stdin.write(b"hello\n"))
            .await
            .expect("a write to a reading process completes while others are pending")
            .unwrap();
        assert_eq!(n, 6);
        assert_eq!(e.wait("other", "").await.unwrap().status, 0);
        assert_eq!(out.await.unwrap(), "got:hello\n");
        e.remove("other", false).await.unwrap();

        // CloseStdin on the first half: their writes (and the queued one)
        // fail at once with the bytes that made it into the pipe.
        let half = STALLED / 2;
        let mut written = Vec::new();
        for (i, w) in writes.drain(..half).enumerate() {
            let p = e.process("stall", &format!("w{i}")).unwrap();
            tokio::time::timeout(Duration::from_secs(5), p.stdio.stdin.close())
                .await
                .expect("close does not wait for the pending write");
            let r = tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("close wakes the pending write")
                .unwrap();
            match r {
                Err(StdinError::Aborted { written: n, len }) => {
                    assert_eq!(len, BIG);
                    assert!(n > 0 && n < BIG, "the pipe took part of it: {n}");
                    written.push(n);
                }
                other => panic!("w{i}: {other:?}"),
            }
            // Closed is closed: later writes are refused, close is idempotent.
            assert!(matches!(
                p.stdio.stdin.write(b"late").await,
                Err(StdinError::Closed)
            ));
            p.stdio.stdin.close().await;
        }
        let q = tokio::time::timeout(Duration::from_secs(5), queued)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(q, Err(StdinError::Aborted { written: 0, len: 6 })),
            "{q:?}"
        );

        // Now every process reads: the remaining writes complete in full
        // (backpressure released, not an error).
        std::fs::write(&go, "").unwrap();
        for (i, w) in writes.into_iter().enumerate() {
            let r = tokio::time::timeout(Duration::from_secs(20), w)
                .await
                .expect("write completes once the process reads")
                .unwrap();
            assert_eq!(r.unwrap(), BIG, "w{}", i + half);
            let p = e.process("stall", &format!("w{}", i + half)).unwrap();
            p.stdio.stdin.close().await;
            written.push(BIG);
        }
        // From inside: each process got EOF right after exactly the bytes
        // reported written (the agent kept no copy of the write end open).
        for (i, (out, n)) in outputs.into_iter().zip(written).enumerate() {
            let out = tokio::time::timeout(Duration::from_secs(20), out)
                .await
                .unwrap_or_else(|_| panic!("w{i} saw no EOF"))
                .unwrap();
            assert_eq!(out.trim(), n.to_string(), "w{i}");
            assert_eq!(e.wait("stall", &format!("w{i}")).await.unwrap().status, 0);
        }
        // A process that exits without reading ends the pending write with
        // EPIPE (its read end is gone), not a hang.
        exec(&e, "stall", "gone", "sleep 0.3", false).await;
        let p = e.process("stall", "gone").unwrap();
        let r = tokio::time::timeout(Duration::from_secs(20), p.stdio.stdin.write(&data))
            .await
            .expect("the exit ends the write");
        match r {
            Err(StdinError::Io {
                written,
                len,
                source,
            }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EPIPE), "{source}");
                assert!(written > 0 && written < len, "{written}");
            }
            other => panic!("{other:?}"),
        }
        e.signal("stall", "", 9, false).unwrap();
        e.wait("stall", "").await.unwrap();
        e.remove("stall", false).await.unwrap();
    });
}

#[test]
fn terminal_stdin_and_stdout_share_the_master() {
    let root = common::busybox_rootfs();
    let rootfs = root.path().to_path_buf();
    let (e, rt) = engine();
    rt.block_on(async move {
        create(&e, "tty", common::spec("sleep 1000"), &rootfs, false).await;

        // Both directions through the (non-blocking) master at once. Each
        // process says "ready" once echo is off, or the input would be echoed.
        exec(
            &e,
            "tty",
            "echo",
            "stty -echo; echo ready; read line; echo got:$line",
            true,
        )
        .await;
        let p = e.process("tty", "echo").unwrap();
        let mut rx = read_stream(&p.stdio.stdout, 1024, 4).unwrap();
        read_until(&mut rx, "ready").await;
        assert_eq!(p.stdio.stdin.write(b"hello\n").await.unwrap(), 6);
        let out = collect(rx).await;
        assert_eq!(e.wait("tty", "echo").await.unwrap().status, 0);
        assert_eq!(out.trim(), "got:hello");

        // CloseStdin sends VEOF: `cat` ends.
        exec(
            &e,
            "tty",
            "cat",
            "stty -echo; echo ready; cat; echo cat-done",
            true,
        )
        .await;
        let p = e.process("tty", "cat").unwrap();
        let mut rx = read_stream(&p.stdio.stdout, 1024, 4).unwrap();
        read_until(&mut rx, "ready").await;
        p.stdio.stdin.write(b"abc\n").await.unwrap();
        p.stdio.stdin.close().await;
        let text = collect(rx).await;
        assert_eq!(e.wait("tty", "cat").await.unwrap().status, 0);
        assert_eq!(text.replace('\r', ""), "abc\ncat-done\n", "{text:?}");

        // A terminal that is never read: the write waits for room in its
        // input queue, close aborts it, and the output side still works.
        exec(
            &e,
            "tty",
            "stall",
            "stty raw -echo; echo ready; sleep 1000",
            true,
        )
        .await;
        let p = e.process("tty", "stall").unwrap();
        let mut rx = read_stream(&p.stdio.stdout, 1024, 4).unwrap();
        read_until(&mut rx, "ready").await;
        let p2 = Arc::clone(&p);
        let w = tokio::spawn(async move { p2.stdio.stdin.write(&vec![b'y'; BIG]).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !w.is_finished(),
            "a full terminal input queue makes the write wait"
        );
        tokio::time::timeout(Duration::from_secs(5), p.stdio.stdin.close())
            .await
            .expect("close of a full terminal gives up on VEOF");
        let r = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(r, Err(StdinError::Aborted { len: BIG, .. })),
            "{r:?}"
        );
        e.signal("tty", "stall", 9, false).unwrap();
        assert_eq!(e.wait("tty", "stall").await.unwrap().status, 137);
        // The reader saw the end of the terminal, not an error.
        assert_eq!(collect(rx).await, "");

        e.signal("tty", "", 9, false).unwrap();
        e.wait("tty", "").await.unwrap();
        e.remove("tty", false).await.unwrap();
    });
}
