//! Starting a container process: `clone(2)` + setup + `execve(2)`.
//!
//! The agent is multi-threaded (tokio), so the child of `clone` may only do
//! what is safe in a copy of one thread of a multi-threaded process: no
//! allocation (another thread may have held the allocator lock), no locks,
//! no logging, no glibc `setuid` (it signals the other, non-existent threads
//! to change their ids too). The parent therefore prepares everything in a
//! [`ChildPlan`] (C strings, BPF programs, bit masks, raw fds) and the child
//! only makes raw system calls on it.
//!
//! Parent and child talk over two pipes:
//! * report (child -> parent, close-on-exec): fixed 12-byte messages, `P` +
//!   pid (the grandchild of an exec, see below), `R` (set up, waiting for
//!   start), `E` + step + item + errno (failed). EOF after `S` means the
//!   `execve` succeeded.
//! * start (parent -> child): `C` once the parent has put the child into its
//!   cgroup (the child then creates its cgroup namespace and sets itself up),
//!   `S` to `execve`. EOF makes the child exit.
//!
//! `ExecProcess` must join the container's pid namespace, which `setns`
//! applies only to children: the first child joins all namespaces, then
//! clones again with `CLONE_PARENT`, so the grandchild is a direct child of
//! the agent (its status goes through the agent's reaper), reports its pid
//! and the first child exits.
//!
//! Every child is registered with the [`Reaper`] while reaping is paused, so
//! no exit status is ever lost.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::capabilities::{self, CapSets};
use super::console;
use super::rlimits::{self, Rlimit};
use super::rootfs::{self, RootfsPlan};
use super::{namespaces, seccomp, EngineError};
use crate::reaper::{ExitStatus, Reaper};

/// A setup step of the child, for error messages.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Step {
    CloseFds = 1,
    Signals,
    Setns,
    Clone,
    WaitCgroup,
    CgroupNs,
    JoinRoot,
    Setsid,
    Stdio,
    ControllingTty,
    RootPropagation,
    BindRootfs,
    Mkdir,
    Mount,
    Remount,
    MountPropagation,
    Mknod,
    Symlink,
    PivotRoot,
    Sysctl,
    Mask,
    ReadonlyPath,
    RootReadonly,
    Console,
    Hostname,
    Domainname,
    Rlimit,
    Seccomp,
    KeepCaps,
    CapBounding,
    ChownStdio,
    Setgroups,
    Setgid,
    Setuid,
    Capset,
    AmbientCaps,
    Cwd,
    NoNewPrivileges,
    Report,
    WaitStart,
    Exec,
}

const STEPS: &[Step] = &[
    Step::CloseFds,
    Step::Signals,
    Step::Setns,
    Step::Clone,
    Step::WaitCgroup,
    Step::CgroupNs,
    Step::JoinRoot,
    Step::Setsid,
    Step::Stdio,
    Step::ControllingTty,
    Step::RootPropagation,
    Step::BindRootfs,
    Step::Mkdir,
    Step::Mount,
    Step::Remount,
    Step::MountPropagation,
    Step::Mknod,
    Step::Symlink,
    Step::PivotRoot,
    Step::Sysctl,
    Step::Mask,
    Step::ReadonlyPath,
    Step::RootReadonly,
    Step::Console,
    Step::Hostname,
    Step::Domainname,
    Step::Rlimit,
    Step::Seccomp,
    Step::KeepCaps,
    Step::CapBounding,
    Step::ChownStdio,
    Step::Setgroups,
    Step::Setgid,
    Step::Setuid,
    Step::Capset,
    Step::AmbientCaps,
    Step::Cwd,
    Step::NoNewPrivileges,
    Step::Report,
    Step::WaitStart,
    Step::Exec,
];

/// A failed child step: which, on which item (mount, device, ... label or
/// capability number), with which errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fail {
    /// The step.
    pub step: Step,
    /// Step-specific item index.
    pub item: u32,
    /// errno.
    pub errno: i32,
}

/// Everything the child needs, prepared by the parent.
#[derive(Debug, Default)]
pub(crate) struct ChildPlan {
    pub stdio: [RawFd; 3],
    pub terminal: bool,
    /// Allocate the terminal inside the container once its root is set up and send the master over this
    /// socket ([`console`]); `stdio` is then only what the child holds until then.
    pub console_socket: Option<RawFd>,
    pub setns: Vec<(RawFd, libc::c_int)>,
    /// Clone once more after setns (to enter a joined pid namespace).
    pub double_clone: bool,
    pub new_cgroup_ns: bool,
    /// In a new user namespace whose maps include ids 0: become its root
    /// once the maps are written, so that files the setup creates (mount
    /// points, device nodes) get a mapped owner (else EOVERFLOW).
    pub userns_root: bool,
    /// chroot into this directory fd (the root of a running container).
    pub join_root: Option<RawFd>,
    pub rootfs: Option<RootfsPlan>,
    pub hostname: Option<CString>,
    pub domainname: Option<CString>,
    pub rlimits: Vec<Rlimit>,
    pub umask: Option<libc::mode_t>,
    pub no_new_privs: bool,
    pub seccomp: Vec<seccompiler::BpfProgram>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub caps: CapSets,
    pub last_cap: u32,
    pub cwd: CString,
    /// Candidates for the executable (PATH search done by the parent).
    pub exec_paths: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    // Filled by `launch`.
    pub(crate) report_w: RawFd,
    pub(crate) start_r: RawFd,
    pub(crate) keep_fds: Vec<RawFd>,
    pub(crate) argv_ptrs: Vec<*const libc::c_char>,
    pub(crate) envp_ptrs: Vec<*const libc::c_char>,
}

/// A container process that is set up and waits for `S` (or, before `C`, for its cgroup).
#[derive(Debug)]
pub struct Launched {
    pub(crate) pid: i32,
    pub(crate) exit_rx: oneshot::Receiver<ExitStatus>,
    start_w: OwnedFd,
    report_r: OwnedFd,
}

const MSG_LEN: usize = 12;
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

enum Msg {
    Ready,
    Pid(i32),
    Failed(Fail),
    Eof,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), EngineError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| EngineError::Internal(format!("pipe2: {e}")))
}

fn errno() -> i32 {
    nix::errno::Errno::last_raw()
}

/// Describes a failure for the API.
pub(crate) fn describe(f: &Fail, labels: &[String], argv0: &str) -> String {
    let what = match f.step {
        Step::Exec => format!("exec {argv0:?}"),
        Step::CapBounding | Step::AmbientCaps => format!(
            "{:?} ({})",
            f.step,
            capabilities::NAMES.get(f.item as usize).unwrap_or(&"?")
        ),
        Step::Mkdir
        | Step::Mount
        | Step::Remount
        | Step::MountPropagation
        | Step::Mknod
        | Step::Sysctl
        | Step::Mask
        | Step::ReadonlyPath => format!(
            "{:?} {}",
            f.step,
            labels
                .get(f.item as usize)
                .map(String::as_str)
                .unwrap_or("?")
        ),
        Step::Console => format!(
            "terminal: {}",
            console::SUBSTEPS.get(f.item as usize).unwrap_or(&"?")
        ),
        Step::ChownStdio => format!("{:?} (fd {})", f.step, f.item),
        _ => format!("{:?}", f.step),
    };
    format!("{what}: {}", std::io::Error::from_raw_os_error(f.errno))
}

fn recv(fd: &OwnedFd, deadline: Instant) -> Result<Msg, EngineError> {
    let mut buf = [0u8; MSG_LEN];
    let mut got = 0;
    while got < MSG_LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 && errno() == libc::EINTR {
            continue;
        }
        if r == 0 {
            return Err(EngineError::Internal(format!(
                "container process did not report within {SETUP_TIMEOUT:?}"
            )));
        }
        // SAFETY: reading into the rest of our buffer.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                MSG_LEN - got,
            )
        };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(EngineError::Internal(format!(
                "reading the setup pipe: {}",
                std::io::Error::last_os_error()
            )));
        }
        if n == 0 {
            return if got == 0 {
                Ok(Msg::Eof)
            } else {
                Err(EngineError::Internal(
                    "short message on the setup pipe".into(),
                ))
            };
        }
        got += n as usize;
    }
    let item = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let err = i32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    match buf[0] {
        b'R' => Ok(Msg::Ready),
        b'P' => Ok(Msg::Pid(item as i32)),
        b'E' => {
            let step = STEPS
                .iter()
                .copied()
                .find(|s| *s as u8 == buf[1])
                .unwrap_or(Step::Report);
            Ok(Msg::Failed(Fail {
                step,
                item,
                errno: err,
            }))
        }
        t => Err(EngineError::Internal(format!("bad setup message tag {t}"))),
    }
}

fn send(fd: &OwnedFd, b: u8) -> Result<(), EngineError> {
    // SAFETY: writing one byte from a local.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&b as *const u8).cast(), 1) };
    if n != 1 {
        return Err(EngineError::Internal(format!(
            "writing the start pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Error raised when the child reported a failed step.
pub(crate) struct ChildFailed(pub Fail);

/// Clones the child (and for `double_clone` the grandchild), registers it
/// with the reaper, calls `place(pid)` (cgroup, oom_score_adj), lets it set
/// itself up and waits until it is ready to exec.
pub(crate) fn launch(
    plan: &mut ChildPlan,
    reaper: &Reaper,
    clone_flags: libc::c_int,
    place: impl FnOnce(i32) -> Result<(), EngineError>,
) -> Result<Launched, Result<ChildFailed, EngineError>> {
    let (report_r, report_w) = pipe().map_err(Err)?;
    let (start_r, start_w) = pipe().map_err(Err)?;
    plan.report_w = report_w.as_raw_fd();
    plan.start_r = start_r.as_raw_fd();
    let mut keep: Vec<RawFd> = vec![plan.report_w, plan.start_r];
    keep.extend(plan.stdio);
    keep.extend(plan.setns.iter().map(|(fd, _)| *fd));
    keep.extend(plan.join_root);
    keep.extend(plan.console_socket);
    keep.sort_unstable();
    keep.dedup();
    plan.keep_fds = keep;
    plan.argv_ptrs = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    plan.envp_ptrs = plan
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let deadline = Instant::now() + SETUP_TIMEOUT;

    let mut guard = reaper.lock();
    // SAFETY: a fork-like clone (no CLONE_VM, no new stack). The child runs
    // only `child_main`, which never returns and does not allocate.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (clone_flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        child_main(plan);
    }
    if pid < 0 {
        return Err(Err(EngineError::Internal(format!(
            "clone: {}",
            std::io::Error::last_os_error()
        ))));
    }
    let first = pid as i32;
    drop(report_w);
    drop(start_r);
    let pid = if plan.double_clone {
        let msg = recv(&report_r, deadline);
        // The first child exits right after reporting; reap it here (the
        // reaper is paused by our guard).
        if let Err(e) = &msg {
            // SAFETY: kill(2) with integers.
            unsafe { libc::kill(first, libc::SIGKILL) };
            tracing::debug!("exec intermediate: {e}");
        }
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(first),
            Some(nix::sys::wait::WaitPidFlag::__WALL),
        );
        match msg.map_err(Err)? {
            Msg::Pid(p) if p > 0 => p,
            Msg::Failed(f) => return Err(Ok(ChildFailed(f))),
            _ => {
                return Err(Err(EngineError::Internal(
                    "exec: the intermediate process died".into(),
                )))
            }
        }
    } else {
        first
    };
    let exit_rx = guard.register(pid);
    drop(guard);
    let kill = || {
        // SAFETY: kill(2) with integers; the pid is registered and not yet
        // reaped, so it cannot have been recycled.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    };
    if let Err(e) = place(pid) {
        kill();
        return Err(Err(e));
    }
    if let Err(e) = send(&start_w, b'C') {
        kill();
        return Err(Err(e));
    }
    match recv(&report_r, deadline) {
        Ok(Msg::Ready) => Ok(Launched {
            pid,
            exit_rx,
            start_w,
            report_r,
        }),
        Ok(Msg::Failed(f)) => {
            kill();
            Err(Ok(ChildFailed(f)))
        }
        Ok(_) => {
            kill();
            Err(Err(EngineError::Internal(
                "container process died during setup".into(),
            )))
        }
        Err(e) => {
            kill();
            Err(Err(e))
        }
    }
}

impl Launched {
    /// Lets the child `execve`; returns once it did (or failed to).
    pub(crate) fn start(
        self,
    ) -> Result<(i32, oneshot::Receiver<ExitStatus>), Result<ChildFailed, EngineError>> {
        send(&self.start_w, b'S').map_err(Err)?;
        match recv(&self.report_r, Instant::now() + SETUP_TIMEOUT) {
            Ok(Msg::Eof) => Ok((self.pid, self.exit_rx)),
            Ok(Msg::Failed(f)) => Err(Ok(ChildFailed(f))),
            Ok(_) => Err(Err(EngineError::Internal(
                "unexpected setup message".into(),
            ))),
            Err(e) => Err(Err(e)),
        }
    }

    /// Abandons a created child (it exits when the start pipe closes).
    pub(crate) fn abandon(self) -> oneshot::Receiver<ExitStatus> {
        // SAFETY: kill(2) with integers; the pid is registered, not reaped.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        self.exit_rx
    }
}

// ---- child side: no allocation, no locks, never returns ----

fn report(fd: RawFd, tag: u8, step: u8, item: u32, err: i32) {
    let mut m = [0u8; MSG_LEN];
    m[0] = tag;
    m[1] = step;
    m[4..8].copy_from_slice(&item.to_le_bytes());
    m[8..12].copy_from_slice(&err.to_le_bytes());
    // SAFETY: writing a local buffer. Short writes of 12 bytes to a pipe
    // do not happen (PIPE_BUF atomicity).
    unsafe { libc::write(fd, m.as_ptr().cast(), MSG_LEN) };
}

fn child_main(plan: &ChildPlan) -> ! {
    match child_setup(plan) {
        Ok(()) => {}
        Err(f) => {
            report(plan.report_w, b'E', f.step as u8, f.item, f.errno);
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(1) }
        }
    }
    // Exec: try each candidate like execvp; remember EACCES.
    let mut err = libc::ENOENT;
    let mut saw_eacces = false;
    for path in &plan.exec_paths {
        // SAFETY: NULL-terminated pointer arrays into CStrings of the plan.
        unsafe {
            libc::execve(
                path.as_ptr(),
                plan.argv_ptrs.as_ptr(),
                plan.envp_ptrs.as_ptr(),
            )
        };
        err = errno();
        if err == libc::EACCES {
            saw_eacces = true;
        }
        if !matches!(err, libc::ENOENT | libc::ENOTDIR | libc::EACCES) {
            break;
        }
    }
    if saw_eacces && err != libc::ENOEXEC {
        err = libc::EACCES;
    }
    report(plan.report_w, b'E', Step::Exec as u8, 0, err);
    // SAFETY: _exit never returns.
    unsafe { libc::_exit(127) }
}

fn chk(r: libc::c_long, step: Step, item: u32) -> Result<(), Fail> {
    if r < 0 {
        return Err(Fail {
            step,
            item,
            errno: errno(),
        });
    }
    Ok(())
}

fn read_byte(fd: RawFd) -> Option<u8> {
    let mut b = 0u8;
    loop {
        // SAFETY: reading one byte into a local.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        if n == 1 {
            return Some(b);
        }
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        return None;
    }
}

/// Gives fds 0-2 to the process's user before it becomes that user, as runc does: its terminal
/// (`ls -l $(tty)` shows the user; the group, `tty` from devpts' `gid=5`, stays) and pipes
/// (`/dev/stdout` can be reopened). `/dev/null` is left alone; EPERM / EINVAL (an owner not mapped into a
/// user namespace) and EROFS are not errors, as in runc.
fn chown_stdio(uid: u32) -> Result<(), Fail> {
    let null = libc::makedev(1, 3);
    for fd in 0..3 {
        // SAFETY: an all-zero stat is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into the stat we own.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            continue; // not open
        }
        if st.st_uid == uid || (st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == null) {
            continue;
        }
        // SAFETY: fchown of one of our descriptors; gid -1 keeps the group.
        if unsafe { libc::fchown(fd, uid, libc::gid_t::MAX) } != 0
            && !matches!(errno(), libc::EPERM | libc::EINVAL | libc::EROFS)
        {
            return Err(Fail {
                step: Step::ChownStdio,
                item: fd as u32,
                errno: errno(),
            });
        }
    }
    Ok(())
}

/// Closes every descriptor not in `keep` (sorted).
fn close_others(keep: &[RawFd]) -> Result<(), Fail> {
    let mut lo: libc::c_uint = 3;
    for &fd in keep.iter().chain([&(i32::MAX)]) {
        let fd = fd as libc::c_uint;
        if fd > lo {
            // SAFETY: close_range on a range of numbers we do not need.
            let r = unsafe { libc::syscall(libc::SYS_close_range, lo, fd - 1, 0) };
            chk(r, Step::CloseFds, 0)?;
        }
        lo = lo.max(fd.saturating_add(1));
    }
    Ok(())
}

#[allow(clippy::too_many_lines)]
fn child_setup(p: &ChildPlan) -> Result<(), Fail> {
    close_others(&p.keep_fds)?;
    // SAFETY (whole function): raw syscalls with plain values or pointers
    // into the plan, in a single-threaded child.
    unsafe {
        // Default dispositions and an empty mask (the runtime ignores
        // SIGPIPE and may block signals; both would be inherited by exec).
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        chk(
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) as libc::c_long,
            Step::Signals,
            0,
        )?;

        for (i, (fd, t)) in p.setns.iter().enumerate() {
            namespaces::setns(*fd, *t).map_err(|e| Fail {
                step: Step::Setns,
                item: i as u32,
                errno: e,
            })?;
        }
        if p.double_clone {
            let r = libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            );
            chk(r, Step::Clone, 0)?;
            if r > 0 {
                report(p.report_w, b'P', 0, r as u32, 0);
                libc::_exit(0);
            }
        }
        if read_byte(p.start_r) != Some(b'C') {
            libc::_exit(1);
        }
        if p.userns_root {
            chk(libc::syscall(libc::SYS_setresgid, 0, 0, 0), Step::Setgid, 1)?;
            chk(libc::syscall(libc::SYS_setresuid, 0, 0, 0), Step::Setuid, 1)?;
        }
        if p.new_cgroup_ns {
            chk(
                libc::unshare(libc::CLONE_NEWCGROUP) as libc::c_long,
                Step::CgroupNs,
                0,
            )?;
        }
        if let Some(fd) = p.join_root {
            chk(libc::fchdir(fd) as libc::c_long, Step::JoinRoot, 0)?;
            chk(
                libc::chroot(c".".as_ptr()) as libc::c_long,
                Step::JoinRoot,
                1,
            )?;
            chk(
                libc::chdir(c"/".as_ptr()) as libc::c_long,
                Step::JoinRoot,
                2,
            )?;
        }
        chk(libc::setsid() as libc::c_long, Step::Setsid, 0)?;
        for (i, fd) in p.stdio.iter().enumerate() {
            chk(
                libc::dup2(*fd, i as libc::c_int) as libc::c_long,
                Step::Stdio,
                i as u32,
            )?;
        }
        if p.terminal && p.console_socket.is_none() {
            chk(
                libc::ioctl(0, libc::TIOCSCTTY, 0) as libc::c_long,
                Step::ControllingTty,
                0,
            )?;
        }
        if let Some(r) = &p.rootfs {
            rootfs::apply(r)?;
        }
        // Now `/dev/ptmx` is the container's own (after pivot_root, or the chroot of an exec).
        if let Some(sock) = p.console_socket {
            // Only a container's init (it sets up the root) gets /dev/console, as under runc.
            console::setup_in_child(sock, p.rootfs.is_some())?;
        }
        if let Some(h) = &p.hostname {
            chk(
                libc::sethostname(h.as_ptr(), h.as_bytes().len()) as libc::c_long,
                Step::Hostname,
                0,
            )?;
        }
        if let Some(d) = &p.domainname {
            chk(
                libc::setdomainname(d.as_ptr(), d.as_bytes().len()) as libc::c_long,
                Step::Domainname,
                0,
            )?;
        }
        for (i, l) in p.rlimits.iter().enumerate() {
            rlimits::apply(l).map_err(|e| Fail {
                step: Step::Rlimit,
                item: i as u32,
                errno: e,
            })?;
        }
        if let Some(m) = p.umask {
            libc::umask(m);
        }
        // Without no_new_privileges the filter needs CAP_SYS_ADMIN: install
        // it while still privileged (the profile must allow what follows).
        if !p.no_new_privs {
            for (i, prog) in p.seccomp.iter().enumerate() {
                seccomp::install(prog).map_err(|e| Fail {
                    step: Step::Seccomp,
                    item: i as u32,
                    errno: e,
                })?;
            }
        }
        chk(
            libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long,
            Step::KeepCaps,
            0,
        )?;
        capabilities::drop_bounding(p.caps.bounding, p.last_cap).map_err(|(cap, e)| Fail {
            step: Step::CapBounding,
            item: cap,
            errno: e,
        })?;
        chown_stdio(p.uid)?;
        // Raw syscalls: glibc's wrappers would try to sync other threads.
        chk(
            libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()),
            Step::Setgroups,
            0,
        )?;
        chk(
            libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid),
            Step::Setgid,
            0,
        )?;
        chk(
            libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid),
            Step::Setuid,
            0,
        )?;
        capabilities::capset(&p.caps).map_err(|e| Fail {
            step: Step::Capset,
            item: 0,
            errno: e,
        })?;
        capabilities::set_ambient(p.caps.ambient, p.last_cap).map_err(|(cap, e)| Fail {
            step: Step::AmbientCaps,
            item: cap,
            errno: e,
        })?;
        chk(libc::chdir(p.cwd.as_ptr()) as libc::c_long, Step::Cwd, 0)?;
        if p.no_new_privs {
            chk(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long,
                Step::NoNewPrivileges,
                0,
            )?;
            for (i, prog) in p.seccomp.iter().enumerate() {
                seccomp::install(prog).map_err(|e| Fail {
                    step: Step::Seccomp,
                    item: i as u32,
                    errno: e,
                })?;
            }
        }
        // Everything but stdio closes on exec, including the report pipe,
        // whose EOF tells the parent that execve succeeded.
        for fd in &p.keep_fds {
            if *fd > 2 {
                libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        report(p.report_w, b'R', 0, 0, 0);
        if read_byte(p.start_r) != Some(b'S') {
            libc::_exit(1);
        }
    }
    Ok(())
}
