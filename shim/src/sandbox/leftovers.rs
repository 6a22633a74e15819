//! Removing what a pod left behind when its shim could not clean up (the shim was killed, or crashed):
//! containerd then runs `containerd-shim-husk-v2 ... delete`, which lands here. Also the last step of a
//! normal stop.
//!
//! Processes are found by their pid files and killed only if their command line still names this pod's
//! state directory, so that a recycled pid is never hit.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::SandboxDir;
use crate::host_mount;

/// Kills the process in `pid_file` with SIGKILL if its command line contains `must_contain`, and waits (up
/// to 5 s) until it is gone. Returns whether a process was killed.
pub fn kill_pid_file(pid_file: &Path, must_contain: &str) -> bool {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return false;
    };
    let cmdline = |pid: i32| std::fs::read(format!("/proc/{pid}/cmdline")).ok();
    let Some(cmd) = cmdline(pid) else {
        return false;
    };
    if !String::from_utf8_lossy(&cmd).contains(must_contain) {
        return false;
    }
    tracing::info!(pid, file = %pid_file.display(), "killing a pod process");
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    // Our own child stays a zombie until its waiter reaps it; a zombie has an empty cmdline.
    while Instant::now() < deadline {
        match cmdline(pid) {
            Some(c) if !c.is_empty() => std::thread::sleep(Duration::from_millis(10)),
            _ => break,
        }
    }
    true
}

/// What the command line of this pod's VMM and virtiofsd contains (their socket paths): the state dir with
/// a trailing slash, so that pod `p1` never matches pod `p10`.
pub fn marker(dir: &SandboxDir) -> String {
    format!("{}/", dir.root().display())
}

/// Kills the pod's VMM and virtiofsd if they still run, unmounts everything in the share and removes the
/// state directory. Best effort: every step is tried and failures are logged.
pub fn remove(dir: &SandboxDir) {
    let marker = marker(dir);
    kill_pid_file(&dir.vmm_pid(), &marker);
    kill_pid_file(&dir.virtiofsd_pid(), &marker);
    if let Err(e) = host_mount::unmount_tree(dir.root()) {
        tracing::warn!(dir = %dir.root().display(), error = %e, "cleaning up the pod's state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_only_a_matching_process() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().to_string_lossy().into_owned();
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pidf = tmp.path().join("p.pid");
        std::fs::write(&pidf, child.id().to_string()).unwrap();
        // The child's /proc cmdline can read empty for a moment after spawn.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read(format!("/proc/{}/cmdline", child.id()))
            .unwrap()
            .is_empty()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // `sleep 100` does not mention the directory: left alone.
        assert!(!kill_pid_file(&pidf, &marker));
        assert!(child.try_wait().unwrap().is_none());
        assert!(kill_pid_file(&pidf, "100"));
        let st = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        // Garbage and missing pid files are ignored.
        std::fs::write(&pidf, "1").unwrap();
        assert!(!kill_pid_file(&pidf, ""));
        std::fs::write(&pidf, "x").unwrap();
        assert!(!kill_pid_file(&pidf, ""));
        assert!(!kill_pid_file(&tmp.path().join("none"), ""));
    }
}
