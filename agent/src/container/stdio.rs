//! A process's stdio: pipes or a pseudo terminal, and the agent's async
//! ends of them (bounded reads for the output streams, writes for stdin).
//!
//! Every agent end is non-blocking and driven by the tokio reactor: no read
//! or write ever holds a thread, so processes that never read their stdin
//! (or never have their output read) cannot exhaust the runtime's threads.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch, Mutex};

use super::EngineError;

/// How long `CloseStdin` waits for room in a terminal's input queue to
/// send VEOF before giving up on it (the stdin is closed either way).
const VEOF_TIMEOUT: Duration = Duration::from_secs(1);

/// The child's ends (to become fds 0, 1, 2).
#[derive(Debug)]
pub(crate) struct ChildStdio {
    pub fds: Vec<OwnedFd>,
}

impl ChildStdio {
    pub(crate) fn raw(&self) -> [RawFd; 3] {
        match self.fds.as_slice() {
            [one] => [one.as_raw_fd(); 3],
            [a, b, c] => [a.as_raw_fd(), b.as_raw_fd(), c.as_raw_fd()],
            _ => [-1; 3],
        }
    }
}

/// An output stream (stdout / stderr / pty master) with at most one reader.
pub type Output = Arc<Mutex<Option<OwnedFd>>>;

/// Why a stdin write or close failed.
#[derive(Debug, thiserror::Error)]
pub enum StdinError {
    /// No stdin was requested, or `CloseStdin` came before this write.
    #[error("stdin is closed or was not requested")]
    Closed,
    /// `CloseStdin` came while this write was pending (the process was not
    /// reading); the first `written` bytes reached the process.
    #[error("stdin was closed while this write was pending ({written} of {len} bytes written)")]
    Aborted {
        /// Bytes that were written before the close.
        written: usize,
        /// Bytes of the request.
        len: usize,
    },
    /// The write failed (EPIPE: the process closed its stdin or exited).
    #[error("writing stdin ({written} of {len} bytes written): {source}")]
    Io {
        /// Bytes that were written before the error.
        written: usize,
        /// Bytes of the request.
        len: usize,
        /// The error of write(2) or of the reactor.
        #[source]
        source: io::Error,
    },
}

/// The write side of a process's stdin: the pipe's write end, or a dup of
/// the pty master, in non-blocking mode.
///
/// Writes are serialised (concurrent writers would interleave their bytes
/// at arbitrary partial-write boundaries) and await writability on the
/// reactor, so a full pipe holds no thread. [`Stdin::close`] first flags
/// the stdin closed, which wakes every pending or queued write (they fail
/// with [`StdinError::Aborted`]), then closes the descriptor: nothing else
/// keeps it open, so the process sees EOF at once.
#[derive(Debug)]
pub struct Stdin {
    /// Taken by the writer for the duration of a write; `None` once closed
    /// (or never requested).
    fd: Mutex<Option<StdinFd>>,
    /// `true` once closed: checked before and raced against every wait.
    closed: watch::Sender<bool>,
    /// A terminal: closing sends VEOF instead of relying on EOF.
    terminal: bool,
}

/// The descriptor, registered with the reactor on first use (creation may
/// run outside a runtime context, e.g. on a plain thread in tests).
#[derive(Debug)]
enum StdinFd {
    Raw(OwnedFd),
    Registered(AsyncFd<OwnedFd>),
}

/// The registered descriptor in `slot` (registering it on first use);
/// `None` if the stdin is closed.
fn registered(slot: &mut Option<StdinFd>) -> io::Result<Option<&AsyncFd<OwnedFd>>> {
    if let Some(StdinFd::Raw(_)) = slot {
        let Some(StdinFd::Raw(fd)) = slot.take() else {
            unreachable!("matched above")
        };
        // SAFETY: an OwnedFd is a valid descriptor that stays open and the
        // same until the AsyncFd is dropped (it is never taken out again).
        match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE) } {
            Ok(a) => *slot = Some(StdinFd::Registered(a)),
            Err(e) => {
                let (fd, e) = e.into_parts();
                *slot = Some(StdinFd::Raw(fd));
                return Err(e);
            }
        }
    }
    Ok(match slot {
        Some(StdinFd::Registered(a)) => Some(a),
        _ => None,
    })
}

impl Stdin {
    fn new(fd: Option<OwnedFd>, terminal: bool) -> Self {
        Self {
            closed: watch::Sender::new(fd.is_none()),
            fd: Mutex::new(fd.map(StdinFd::Raw)),
            terminal,
        }
    }

    /// A process without stdin (it reads /dev/null).
    pub fn none() -> Self {
        Self::new(None, false)
    }

    /// Writes all of `data`; returns its length. Waits (without a thread)
    /// while the pipe or the terminal's input queue is full: the caller's
    /// backpressure. Cancel-safe: dropping the future stops the write
    /// (bytes already written stay written).
    pub async fn write(&self, data: &[u8]) -> Result<usize, StdinError> {
        let len = data.len();
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(StdinError::Closed);
        }
        let mut slot = tokio::select! {
            biased;
            _ = closed.wait_for(|c| *c) => return Err(StdinError::Aborted { written: 0, len }),
            g = self.fd.lock() => g,
        };
        let io_err = |written, source| StdinError::Io {
            written,
            len,
            source,
        };
        let Some(afd) = registered(&mut slot).map_err(|e| io_err(0, e))? else {
            return Err(StdinError::Closed);
        };
        let mut off = 0;
        while off < len {
            let mut ready = tokio::select! {
                biased;
                _ = closed.wait_for(|c| *c) => {
                    return Err(StdinError::Aborted { written: off, len });
                }
                r = afd.writable() => r.map_err(|e| io_err(off, e))?,
            };
            match ready.try_io(|a| write_some(a.get_ref(), &data[off..])) {
                Ok(Ok(n)) => off += n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(io_err(off, e)),
                // EAGAIN: readiness cleared, wait again.
                Err(_would_block) => {}
            }
        }
        Ok(off)
    }

    /// Closes the stdin: pending and queued writes fail with
    /// [`StdinError::Aborted`], later ones with [`StdinError::Closed`]. For
    /// a terminal, sends VEOF (^D) first if its input queue has room within
    /// [`VEOF_TIMEOUT`] (the process may never read). Idempotent.
    pub async fn close(&self) {
        self.closed.send_replace(true);
        // Pending writers see the flag and drop the lock.
        let mut slot = self.fd.lock().await.take();
        if self.terminal {
            let sent = match registered(&mut slot) {
                Ok(None) => return, // closed before
                Ok(Some(afd)) => tokio::time::timeout(VEOF_TIMEOUT, async {
                    loop {
                        let mut ready = afd.writable().await?;
                        match ready.try_io(|a| write_some(a.get_ref(), &[4])) {
                            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                            Ok(r) => return r.map(drop),
                            Err(_would_block) => {}
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::warn!("closing a terminal's stdin: VEOF not sent: {e}");
            }
        }
        // Dropping `slot` deregisters the descriptor and closes the agent's
        // last copy of it.
        drop(slot);
    }
}

/// One non-blocking write(2).
fn write_some(fd: &OwnedFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: writes from a live slice of `data.len()` bytes to an open
    // descriptor we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The agent's ends.
#[derive(Debug)]
pub struct ParentStdio {
    /// Write side of stdin (the pipe, or a dup of the pty master).
    pub stdin: Stdin,
    /// stdout (or the pty master).
    pub stdout: Output,
    /// stderr (empty for a terminal).
    pub stderr: Output,
    /// The pty master, for ResizePty.
    pub pty: Option<OwnedFd>,
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The agent's ends of a terminal whose master is `master` (from the guest's devpts, or sent by a
/// container process that allocated it in its own, see [`super::console`]), with the window size `size`.
pub(crate) fn from_pty_master(
    master: OwnedFd,
    size: Option<(u16, u16)>,
) -> Result<ParentStdio, EngineError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| EngineError::Internal(format!("stdio: {what}: {e}"))
    };
    set_cloexec(&master).map_err(err("cloexec"))?;
    if let Some((rows, cols)) = size {
        resize(&master, rows, cols).map_err(err("window size"))?;
    }
    // O_NONBLOCK belongs to the open file description, which all three dups
    // share (a pty master cannot be reopened): the stdout reader and the
    // stdin writer are both reactor-driven, and the ioctls of ResizePty do
    // not care.
    set_nonblocking(&master).map_err(err("nonblock"))?;
    let input = master.try_clone().map_err(err("dup"))?;
    let output = master.try_clone().map_err(err("dup"))?;
    Ok(ParentStdio {
        stdin: Stdin::new(Some(input), true),
        stdout: Arc::new(Mutex::new(Some(output))),
        stderr: Arc::new(Mutex::new(None)),
        pty: Some(master),
    })
}

/// What a child that allocates its terminal itself holds as fds 0-2 until then: `/dev/null`.
pub(crate) fn placeholder() -> Result<ChildStdio, EngineError> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| EngineError::Internal(format!("stdio: /dev/null: {e}")))?;
    Ok(ChildStdio {
        fds: vec![OwnedFd::from(null)],
    })
}

/// Creates the stdio of a new process: pipes, or a terminal from the guest's devpts.
pub(crate) fn make(
    stdin: bool,
    terminal: bool,
    size: Option<(u16, u16)>,
) -> Result<(ParentStdio, ChildStdio), EngineError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| EngineError::Internal(format!("stdio: {what}: {e}"))
    };
    if terminal {
        let pty = nix::pty::openpty(None, None).map_err(|e| err("openpty")(e.into()))?;
        set_cloexec(&pty.slave).map_err(err("cloexec"))?;
        let parent = from_pty_master(pty.master, size)?;
        return Ok((
            parent,
            ChildStdio {
                fds: vec![pty.slave],
            },
        ));
    }
    let p = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| err("pipe2")(e.into()));
    let (in_child, in_parent) = if stdin {
        // Only the agent's end is non-blocking: the process's read end is
        // another open file description and stays blocking.
        let (r, w) = p()?;
        set_nonblocking(&w).map_err(err("nonblock"))?;
        (r, Stdin::new(Some(w), false))
    } else {
        let null = std::fs::File::open("/dev/null").map_err(err("/dev/null"))?;
        (OwnedFd::from(null), Stdin::none())
    };
    let (out_r, out_w) = p()?;
    let (err_r, err_w) = p()?;
    set_nonblocking(&out_r).map_err(err("nonblock"))?;
    set_nonblocking(&err_r).map_err(err("nonblock"))?;
    Ok((
        ParentStdio {
            stdin: in_parent,
            stdout: Arc::new(Mutex::new(Some(out_r))),
            stderr: Arc::new(Mutex::new(Some(err_r))),
            pty: None,
        },
        ChildStdio {
            fds: vec![in_child, out_w, err_w],
        },
    ))
}

/// Streams `out` in chunks of at most `chunk` bytes into a channel of
/// `depth` chunks, until EOF (or EIO: a terminal whose other side closed).
/// Fails if another reader is active. If the receiver goes away, the
/// descriptor is put back for a later reader.
pub fn read_stream(
    out: &Output,
    chunk: usize,
    depth: usize,
) -> Result<mpsc::Receiver<io::Result<Vec<u8>>>, EngineError> {
    let mut guard = Arc::clone(out)
        .try_lock_owned()
        .map_err(|_| EngineError::FailedPrecondition("the stream already has a reader".into()))?;
    let (tx, rx) = mpsc::channel(depth);
    let Some(fd) = guard.take() else {
        return Ok(rx); // EOF seen before: empty stream
    };
    tokio::spawn(async move {
        // SAFETY: an OwnedFd is a valid descriptor that stays open and the
        // same until the AsyncFd is dropped or `into_inner` returns it.
        let afd = match unsafe { AsyncFd::register(fd) } {
            Ok(a) => a,
            Err(e) => {
                let (fd, e) = e.into_parts();
                *guard = Some(fd);
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut buf = vec![0u8; chunk];
        loop {
            // Reserve channel space first: backpressure without holding data.
            let permit = tokio::select! {
                p = tx.reserve() => match p {
                    Ok(p) => p,
                    Err(_) => break, // reader gone: keep the fd
                },
            };
            let res = loop {
                let mut ready = tokio::select! {
                    r = afd.readable() => match r {
                        Ok(r) => r,
                        Err(e) => break Err(e),
                    },
                    _ = tx.closed() => break Err(io::Error::from(io::ErrorKind::Interrupted)),
                };
                // SAFETY: reading into our buffer from a descriptor we own.
                let n = unsafe {
                    libc::read(
                        afd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n >= 0 {
                    break Ok(n as usize);
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => ready.clear_ready(),
                    Some(libc::EINTR) => {}
                    Some(libc::EIO) => break Ok(0),
                    _ => break Err(e),
                }
            };
            match res {
                Ok(0) => return, // EOF: the slot stays empty
                Ok(n) => permit.send(Ok(buf[..n].to_vec())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => break,
                Err(e) => {
                    permit.send(Err(e));
                    return;
                }
            }
        }
        *guard = Some(afd.into_inner());
    });
    Ok(rx)
}

/// Sets a terminal's window size.
pub fn resize(pty: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own.
    if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
