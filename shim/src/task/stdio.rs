//! containerd's stdio FIFOs ↔ the agent's process streams.
//!
//! * stdout/stderr: the agent's ReadStdout/ReadStderr stream (which ends at the process's EOF) is written to
//!   the FIFO containerd (or `ctr`) reads. The FIFO's read side is already open when Create/Exec arrives.
//! * stdin: the FIFO is opened for reading in a blocking thread (the open returns once the client opens its
//!   write side), each read is sent with WriteStdin (the agent acknowledges once the bytes are in the
//!   process's pipe: end-to-end backpressure), and EOF becomes CloseStdin.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use husk_proto::client::AgentClient;
use tokio::task::JoinHandle;

/// The stdio paths of one process, as containerd gave them (empty = none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// Copies one output stream of a process to its FIFO until EOF. Errors are logged: the process keeps
/// running, like under runc when the reader goes away.
pub fn copy_output(
    agent: AgentClient,
    container_id: String,
    exec_id: String,
    which: Output,
    fifo: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let path = PathBuf::from(&fifo);
        let stream = match which {
            Output::Stdout => agent.read_stdout(&container_id, &exec_id).await,
            Output::Stderr => agent.read_stderr(&container_id, &exec_id).await,
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(container = %container_id, exec = %exec_id, ?which, error = %e, "opening the output stream");
                return;
            }
        };
        let file = match tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new().write(true).open(&path)
        })
        .await
        {
            Ok(Ok(f)) => Some(Arc::new(std::sync::Mutex::new(f))),
            Ok(Err(e)) => {
                tracing::warn!(container = %container_id, %fifo, error = %e, "opening the output FIFO; discarding the output");
                None
            }
            Err(_) => None,
        };
        // Without a reader the output is still drained (and dropped): a process must never block
        // forever on a full pipe because its log reader went away (e.g. containerd restarted).
        let mut sink = file;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(container = %container_id, exec = %exec_id, ?which, error = %e, "reading process output");
                    break;
                }
            };
            let Some(f) = sink.clone() else {
                continue;
            };
            // A FIFO write blocks while the reader is slow: that is the backpressure to the guest.
            let r = tokio::task::spawn_blocking(move || {
                f.lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?
                    .write_all(&chunk)
            })
            .await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::warn!(container = %container_id, %fifo, "output FIFO closed by its reader; discarding further output");
                sink = None;
            }
        }
    })
}

/// The stdin copier of one process.
pub struct StdinCopy {
    pub task: JoinHandle<()>,
    fifo: PathBuf,
}

impl StdinCopy {
    /// Unblocks a copier still waiting in open(2) for a writer (the client never connected): opening the
    /// write side ourselves lets its open return, and our immediate close gives it EOF.
    pub fn unblock(&self) {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.fifo);
    }
}

const STDIN_CHUNK: usize = 64 * 1024;

/// Starts copying `fifo` to the process's stdin. At EOF (the client closed its side) the process's stdin is
/// closed.
pub fn copy_stdin(
    agent: AgentClient,
    container_id: String,
    exec_id: String,
    fifo: &Path,
) -> StdinCopy {
    let path = fifo.to_path_buf();
    let rt = tokio::runtime::Handle::current();
    let task = tokio::task::spawn_blocking(move || {
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(container = %container_id, fifo = %path.display(), error = %e, "opening the stdin FIFO");
                return;
            }
        };
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) =
                        rt.block_on(agent.write_stdin(&container_id, &exec_id, buf[..n].to_vec()))
                    {
                        tracing::debug!(container = %container_id, exec = %exec_id, error = %e, "stdin write failed (process gone?)");
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(container = %container_id, error = %e, "reading the stdin FIFO");
                    break;
                }
            }
        }
        if let Err(e) = rt.block_on(agent.close_stdin(&container_id, &exec_id)) {
            tracing::debug!(container = %container_id, exec = %exec_id, error = %e, "closing stdin");
        }
    });
    StdinCopy {
        task,
        fifo: fifo.to_path_buf(),
    }
}
