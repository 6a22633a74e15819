//! A process's terminal allocated inside the container, from the
//! container's own devpts instance, as runc does it.
//!
//! Once its root is set up (mounts, pivot_root; an exec'd process: after
//! the chroot into the container's root), the child opens `/dev/ptmx` (the
//! `newinstance` devpts of the container, through the `pts/ptmx` link),
//! unlocks it, opens the peer (`TIOCGPTPEER`), sends the master to the agent
//! over a socketpair (`SCM_RIGHTS`), makes the peer its stdio and its
//! controlling terminal. The pts thereby exists in the container's
//! `/dev/pts`, so `tty` names it (`/dev/pts/0`), and it is owned by the
//! container's root (then by the process's user, see `process.rs`).
//!
//! The child sends the master before it reports ready (`R`), so the agent
//! takes it without waiting once the child has reported; a child that fails
//! reports the step instead, and a closed socket never leaves anybody
//! waiting.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

use super::process::{Fail, Step};
use super::EngineError;

/// Sub-steps of [`Step::Console`], for error messages (the `item`).
pub(crate) const SUBSTEPS: &[&str] = &[
    "open /dev/ptmx",
    "unlock the pty",
    "open the pty's peer",
    "send the pty master to the agent",
    "make the pty its stdio",
    "make the pty its controlling terminal",
    "get the pty's number",
    "create /dev/console",
    "bind-mount the pty on /dev/console",
];

/// The agent's end and the child's end of the socketpair that carries the
/// pty master.
#[derive(Debug)]
pub(crate) struct ConsoleSocket {
    parent: OwnedFd,
    child: OwnedFd,
}

impl ConsoleSocket {
    /// A close-on-exec `SOCK_SEQPACKET` pair (one message, one fd).
    pub(crate) fn new() -> Result<Self, EngineError> {
        let (parent, child) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| EngineError::Internal(format!("terminal: socketpair: {e}")))?;
        Ok(ConsoleSocket { parent, child })
    }

    /// The child's end, for the [`super::process::ChildPlan`].
    pub(crate) fn child_fd(&self) -> RawFd {
        self.child.as_raw_fd()
    }

    /// Takes the pty master the child sent. Call only after the child
    /// reported ready: it sent the master before, so this does not block.
    pub(crate) fn receive(self) -> Result<OwnedFd, EngineError> {
        drop(self.child);
        let err = |what: &str| EngineError::Internal(format!("terminal: {what}"));
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!(RawFd);
        let msg = recvmsg::<()>(
            self.parent.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| err(&format!("receiving the pty master from the container: {e}")))?;
        let mut master = None;
        for c in msg
            .cmsgs()
            .map_err(|e| err(&format!("control message: {e}")))?
        {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: SCM_RIGHTS installed `fd` in this process for us; nobody else owns it.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    if master.is_none() {
                        master = Some(fd);
                    }
                }
            }
        }
        let master = master.ok_or_else(|| err("the container process sent no pty master"))?;
        let mut n: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes the pty number into an int we own; it fails on anything but a pty master.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) } < 0 {
            return Err(err(&format!(
                "the received descriptor is not a pty master: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(master)
    }
}

// ---- child side: no allocation, no locks ----

fn fail(item: u32) -> Fail {
    Fail {
        step: Step::Console,
        item,
        errno: nix::errno::Errno::last_raw(),
    }
}

/// Sends `fd` over `sock` with `SCM_RIGHTS`. Raw `sendmsg` with the control
/// buffer on the stack: nix's `sendmsg` allocates it on the heap, which the
/// child of a multi-threaded process must not do.
///
/// # Safety
/// Single-threaded child; `sock` and `fd` are open descriptors.
unsafe fn send_fd(sock: RawFd, fd: RawFd) -> libc::ssize_t {
    const FD_LEN: u32 = std::mem::size_of::<RawFd>() as u32;
    // u64 elements: the alignment cmsghdr needs; 32 bytes ≥ CMSG_SPACE(4) = 24.
    let mut control = [0u64; 4];
    let mut byte = [b'T'; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: a zeroed msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(FD_LEN) } as usize;
    // SAFETY: msg_control points at `control`, which is large enough for one
    // header with one int; CMSG_FIRSTHDR/CMSG_DATA stay within it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(FD_LEN) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    }
}

/// `/dev/pts/<n>` as a C string in `buf` (no allocation).
fn pts_path(n: u32, buf: &mut [u8; 24]) -> *const libc::c_char {
    const PREFIX: &[u8] = b"/dev/pts/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let (mut len, mut v) = (0, n);
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    buf.as_ptr().cast()
}

/// In the child, with the container's root as `/`: allocates the terminal
/// from `/dev/ptmx`, sends the master over `sock`, and makes the peer fds
/// 0, 1, 2 and the controlling terminal (the child is a session leader).
/// For a container's init (`bind_console`), the pty is also bind-mounted on
/// `/dev/console`, as runc does.
///
/// # Safety
/// Single-threaded child after `clone`; `sock` is open.
pub(crate) unsafe fn setup_in_child(sock: RawFd, bind_console: bool) -> Result<(), Fail> {
    // SAFETY (whole function): raw syscalls on descriptors this child owns.
    unsafe {
        let master = libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if master < 0 {
            return Err(fail(0));
        }
        let unlock: libc::c_int = 0;
        if libc::ioctl(master, libc::TIOCSPTLCK, &unlock) < 0 {
            return Err(fail(1));
        }
        let peer = libc::ioctl(
            master,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if peer < 0 {
            return Err(fail(2));
        }
        let mut n: libc::c_uint = 0;
        if libc::ioctl(master, libc::TIOCGPTN, &mut n) < 0 {
            return Err(fail(6));
        }
        if send_fd(sock, master) != 1 {
            return Err(fail(3));
        }
        // The agent holds the master now; ours must not reach the process.
        libc::close(master);
        for target in 0..3 {
            if libc::dup2(peer, target) < 0 {
                return Err(fail(4));
            }
        }
        if peer > 2 {
            libc::close(peer);
        }
        if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(fail(5));
        }
        if bind_console {
            // A bind-mount target; an existing node is only opened (O_NOCTTY: it must not become ours).
            let fd = libc::open(
                c"/dev/console".as_ptr(),
                libc::O_CREAT | libc::O_RDONLY | libc::O_NOCTTY | libc::O_CLOEXEC,
                0o600,
            );
            if fd < 0 {
                return Err(fail(7));
            }
            libc::close(fd);
            let mut buf = [0u8; 24];
            if libc::mount(
                pts_path(n, &mut buf),
                c"/dev/console".as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) < 0
            {
                return Err(fail(8));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pts_path_is_a_c_string() {
        let mut buf = [0xffu8; 24];
        for (n, want) in [
            (0, "/dev/pts/0"),
            (7, "/dev/pts/7"),
            (1048575, "/dev/pts/1048575"),
        ] {
            let p = pts_path(n, &mut buf);
            // SAFETY: pts_path wrote a NUL-terminated string into `buf`.
            let got = unsafe { std::ffi::CStr::from_ptr(p) };
            assert_eq!(got.to_str().unwrap(), want);
        }
        let p = pts_path(u32::MAX, &mut buf);
        // SAFETY: as above.
        assert_eq!(
            unsafe { std::ffi::CStr::from_ptr(p) }.to_str().unwrap(),
            "/dev/pts/4294967295"
        );
    }
}
