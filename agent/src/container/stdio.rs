//! A process's stdio: pipes or a pseudo terminal, and the agent's async
//! ends of them (bounded reads for the output streams, writes for stdin).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, Mutex};

use super::EngineError;

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

/// The agent's ends.
#[derive(Debug)]
pub struct ParentStdio {
    /// Write end of stdin (or a dup of the pty master), until CloseStdin.
    pub stdin: std::sync::Mutex<Option<Arc<OwnedFd>>>,
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
    let input = master.try_clone().map_err(err("dup"))?;
    let output = master.try_clone().map_err(err("dup"))?;
    set_nonblocking(&output).map_err(err("nonblock"))?;
    Ok(ParentStdio {
        stdin: std::sync::Mutex::new(Some(Arc::new(input))),
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
        let (r, w) = p()?;
        (r, Some(Arc::new(w)))
    } else {
        let null = std::fs::File::open("/dev/null").map_err(err("/dev/null"))?;
        (OwnedFd::from(null), None)
    };
    let (out_r, out_w) = p()?;
    let (err_r, err_w) = p()?;
    set_nonblocking(&out_r).map_err(err("nonblock"))?;
    set_nonblocking(&err_r).map_err(err("nonblock"))?;
    Ok((
        ParentStdio {
            stdin: std::sync::Mutex::new(in_parent),
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

/// Writes all of `data` to a stdin descriptor (blocking pipe writes run on
/// the blocking pool, so a full pipe never stalls the runtime).
pub async fn write_all(fd: Arc<OwnedFd>, data: Vec<u8>) -> io::Result<usize> {
    tokio::task::spawn_blocking(move || {
        let mut off = 0;
        while off < data.len() {
            // SAFETY: writing from our buffer to a descriptor we own.
            let n = unsafe {
                libc::write(
                    fd.as_raw_fd(),
                    data[off..].as_ptr().cast(),
                    data.len() - off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            off += n as usize;
        }
        Ok(off)
    })
    .await
    .map_err(io::Error::other)?
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
