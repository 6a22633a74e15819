//! Shared harness for Husk's end-to-end tests, benchmarks and demo: finds the built artifacts, starts
//! `husk-vmm` as a real process with a real guest, talks to the agent through the hybrid vsock socket,
//! and checks what is left behind.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use husk_proto::client::{AgentClient, ClientOptions};
use husk_proto::AGENT_VSOCK_PORT;

pub mod containerd;
pub mod cri;
pub mod virtiofsd;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what} {path} is missing: {hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("/dev/kvm is not usable here ({0}); VM tests must run where KVM boots a stock guest: tests/testhost/run")]
    NoKvm(std::io::Error),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("agent: {0}")]
    Agent(#[from] husk_proto::client::ClientError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// The project checkout (this crate lives in `<root>/tests`).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// Paths of the built pieces a VM test needs.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    /// The guest image the agent boots from: a read-only erofs root (`husk-vmm --rootfs`).
    pub rootfs: PathBuf,
    /// The same files as an initrd (what the image benchmark compares against).
    pub initrd: PathBuf,
    /// A guest image whose /init prints `HUSK-GUEST-INIT ...` and reboots.
    pub marker_initrd: PathBuf,
    /// The device test image (tests/images/guest-e2e.sh as /init, with busybox).
    pub e2e_initrd: PathBuf,
}

impl Artifacts {
    pub fn locate() -> Result<Self, HarnessError> {
        let root = project_root();
        let a = Artifacts {
            vmm: root.join("target/release/husk-vmm"),
            kernel: root.join("build/guest/vmlinux"),
            rootfs: root.join("build/guest/rootfs.erofs"),
            initrd: root.join("build/guest/initrd.img"),
            marker_initrd: root.join("build/testhost/marker-initrd.img"),
            e2e_initrd: root.join("build/testhost/e2e-initrd.img"),
        };
        for (what, path, hint) in [
            ("VMM binary", &a.vmm, "run 'make build'"),
            ("guest kernel", &a.kernel, "run 'make guest'"),
            ("guest root image", &a.rootfs, "run 'make guest'"),
            ("guest initrd", &a.initrd, "run 'make guest'"),
            ("marker initrd", &a.marker_initrd, "run 'make testhost'"),
            ("device test initrd", &a.e2e_initrd, "run 'make testhost'"),
        ] {
            if !path.is_file() {
                return Err(HarnessError::Missing {
                    what,
                    path: path.clone(),
                    hint,
                });
            }
        }
        Ok(a)
    }
}

/// What every VM test starts with: the artifacts, and a usable /dev/kvm. Panics (fails the test) with
/// the reason otherwise: a VM test never passes or skips without KVM.
pub fn vm_test_setup() -> Artifacts {
    let a = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    require_kvm().unwrap_or_else(|e| panic!("{e}"));
    a
}

/// The `RESULT ...` lines the device test image (tests/images/guest-e2e.sh) printed, without the prefix.
pub fn result_lines(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r.trim().to_string()))
        .collect()
}

/// Fails unless /dev/kvm can be opened read-write (a VM test must never pass silently without it).
pub fn require_kvm() -> Result<(), HarnessError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(HarnessError::NoKvm)
}

/// What a test VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestImage {
    /// A read-only root disk (`husk-vmm --rootfs`): it becomes `/dev/vda` (serial `husk-rootfs`), and
    /// `--disk`s follow as `vdb`, `vdc`, ...
    Rootfs(PathBuf),
    /// An initramfs (`husk-vmm --initrd`): `--disk`s start at `vda`.
    Initrd(PathBuf),
}

impl GuestImage {
    fn vmm_args(&self) -> [&std::ffi::OsStr; 2] {
        match self {
            GuestImage::Rootfs(p) => ["--rootfs".as_ref(), p.as_os_str()],
            GuestImage::Initrd(p) => ["--initrd".as_ref(), p.as_os_str()],
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmOptions {
    pub vcpus: u8,
    pub mem_mib: u64,
    pub image: GuestImage,
    pub extra_cmdline: Option<String>,
    /// Console to a pipe that the harness reads (needed for `wait_console_line`), else to a file.
    pub console_to_pipe: bool,
    /// More husk-vmm arguments (`--disk ...`, `--net ...`).
    pub extra_args: Vec<String>,
    /// Serve the control socket at `<vm dir>/control.sock`.
    pub control_socket: bool,
}

impl VmOptions {
    /// The device test image running `scenario` (its init arguments), console piped.
    pub fn scenario(a: &Artifacts, scenario: &str, extra_args: Vec<String>) -> Self {
        VmOptions {
            image: GuestImage::Initrd(a.e2e_initrd.clone()),
            console_to_pipe: true,
            extra_cmdline: Some(format!("-- {scenario}")),
            extra_args,
            ..VmOptions::agent(a)
        }
    }

    /// The agent from the production guest image (the read-only erofs root), as pods boot.
    pub fn agent(a: &Artifacts) -> Self {
        VmOptions {
            vcpus: 1,
            mem_mib: 128,
            image: GuestImage::Rootfs(a.rootfs.clone()),
            extra_cmdline: None,
            console_to_pipe: false,
            extra_args: Vec::new(),
            control_socket: false,
        }
    }
}

/// A running `husk-vmm` process with its own private directory (vsock socket, console log).
pub struct VmProcess {
    child: Child,
    dir: tempfile::TempDir,
    pub started: Instant,
    console_lines: Option<mpsc::Receiver<(Instant, String)>>,
}

impl VmProcess {
    pub fn spawn(a: &Artifacts, o: &VmOptions) -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("husk-vm-")
            .tempdir()
            .map_err(|source| HarnessError::Io {
                what: "creating the VM directory".into(),
                source,
            })?;
        let mut cmd = Command::new(&a.vmm);
        cmd.arg("--kernel")
            .arg(&a.kernel)
            .args(o.image.vmm_args())
            .arg("--vcpus")
            .arg(o.vcpus.to_string())
            .arg("--mem-mib")
            .arg(o.mem_mib.to_string())
            .arg("--vsock-uds")
            .arg(dir.path().join("vsock.sock"))
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(c) = &o.extra_cmdline {
            cmd.arg("--cmdline").arg(c);
        }
        cmd.args(&o.extra_args);
        if o.control_socket {
            cmd.arg("--control-socket")
                .arg(dir.path().join("control.sock"));
        }
        if o.console_to_pipe {
            cmd.arg("--console").arg("stdout").stdout(Stdio::piped());
        } else {
            cmd.arg("--console")
                .arg(dir.path().join("console.log"))
                .stdout(Stdio::null());
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            what: a.vmm.display().to_string(),
            source,
        })?;
        let console_lines = child.stdout.take().map(line_reader);
        Ok(VmProcess {
            child,
            dir,
            started,
            console_lines,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn vsock_path(&self) -> PathBuf {
        self.dir.path().join("vsock.sock")
    }

    /// Waits until the agent answers a Ping through the VM's hybrid vsock socket.
    pub async fn connect_agent(&self, timeout: Duration) -> Result<AgentClient, HarnessError> {
        let opts = ClientOptions {
            retry_initial_backoff: Duration::from_millis(5),
            retry_max_backoff: Duration::from_millis(50),
            ..Default::default()
        };
        let deadline = Instant::now() + timeout;
        // The socket appears once the VMM has set up its devices.
        while !self.vsock_path().exists() {
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(format!(
                    "{} never appeared; console:\n{}",
                    self.vsock_path().display(),
                    self.console()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(
            AgentClient::connect_with_retry(&self.vsock_path(), AGENT_VSOCK_PORT, opts, deadline)
                .await?,
        )
    }

    /// Waits for a console line containing `needle` (console must go to the pipe). Returns the line
    /// and when it was read.
    pub fn wait_console_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<(Instant, String), HarnessError> {
        let mut last = None;
        self.read_console(needle, timeout, |t, line| last = Some((t, line)))?;
        last.ok_or_else(|| HarnessError::Timeout("no console line".into()))
    }

    /// Collects console lines up to and including the first one containing `needle`.
    pub fn console_until(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, HarnessError> {
        let mut lines = Vec::new();
        self.read_console(needle, timeout, |_, line| lines.push(line))?;
        Ok(lines)
    }

    /// Hands every console line to `each`, up to and including the first containing `needle`.
    fn read_console(
        &mut self,
        needle: &str,
        timeout: Duration,
        mut each: impl FnMut(Instant, String),
    ) -> Result<(), HarnessError> {
        let rx = self
            .console_lines
            .as_ref()
            .ok_or_else(|| HarnessError::Timeout("console is not piped".into()))?;
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((t, line)) => {
                    let done = line.contains(needle);
                    seen.push(line.clone());
                    each(t, line);
                    if done {
                        return Ok(());
                    }
                }
                Err(_) => {
                    return Err(HarnessError::Timeout(format!(
                        "no console line containing {needle:?} within {timeout:?}; got:\n{}",
                        seen.join("\n")
                    )))
                }
            }
        }
    }

    /// Sends one request on the VMM's control socket and returns the answer.
    pub fn control(&self, request: &str) -> Result<serde_json::Value, HarnessError> {
        use std::io::Write;
        let io = |what: &str| {
            let what = what.to_string();
            move |source| HarnessError::Io { what, source }
        };
        let path = self.dir.path().join("control.sock");
        let mut s =
            std::os::unix::net::UnixStream::connect(&path).map_err(io("control connect"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io("control timeout"))?;
        s.write_all(format!("{request}\n").as_bytes())
            .map_err(io("control write"))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(io("control read"))?;
        serde_json::from_str(&line).map_err(|e| HarnessError::Io {
            what: format!("control answer {line:?}"),
            source: std::io::Error::other(e),
        })
    }

    /// Waits for the VMM to exit; kills it if `timeout` passes.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        wait_child(&mut self.child, timeout, "husk-vmm")
    }

    /// What the VMM wrote on stderr (only complete once it exited).
    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// The guest console so far (when it goes to a file).
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Resident memory of the VMM process, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.child.id())
    }

    /// Where each thread of the running husk-vmm is: name, scheduler state, wait channel, system
    /// call, CPU time spent over one second (user, system and guest mode, in clock ticks) and
    /// kernel stack (root only). Tells a vCPU blocked in the VMM (a futex) from one stuck inside
    /// KVM_RUN, and a guest spinning in guest mode from a host kernel loop, when a guest stops
    /// answering.
    pub fn thread_dump(&self) -> String {
        let pid = self.child.id();
        let tids = || -> Vec<u32> {
            let mut t: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            t.sort_unstable();
            t
        };
        let read = |tid: u32, f: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/{f}")).unwrap_or_default()
        };
        // Fields after the parenthesised name (which may contain spaces): state is the first,
        // utime the 12th, stime the 13th, guest_time the 41st.
        let stat = |tid: u32| -> Vec<String> {
            read(tid, "stat")
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let times = |f: &[String]| -> [u64; 3] {
            let n = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
            [n(11), n(12), n(40)]
        };
        let before: Vec<(u32, [u64; 3])> =
            tids().into_iter().map(|t| (t, times(&stat(t)))).collect();
        if before.is_empty() {
            return format!("no /proc/{pid}/task (exited)\n");
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut out = String::new();
        for (tid, t0) in before {
            let now = stat(tid);
            let t1 = times(&now);
            let state = now.first().map_or("?", String::as_str);
            out.push_str(&format!(
                "{tid} {} state={state} wchan={} syscall={} last 1 s: user={} sys={} guest={}\n",
                read(tid, "comm").trim(),
                read(tid, "wchan").trim(),
                read(tid, "syscall")
                    .split_whitespace()
                    .next()
                    .unwrap_or("?"),
                t1[0].saturating_sub(t0[0]),
                t1[1].saturating_sub(t0[1]),
                t1[2].saturating_sub(t0[2]),
            ));
            for line in read(tid, "stack").lines().take(12) {
                out.push_str(&format!("    {line}\n"));
            }
        }
        out
    }

    /// The VMM's exit status if it has exited already (for failure reports).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Reads lines on a thread, timestamping each as it arrives.
pub fn line_reader<R: Read + Send + 'static>(r: R) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn wait_child(
    child: &mut Child,
    timeout: Duration,
    what: &str,
) -> Result<ExitStatus, HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Ok(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::Timeout(format!(
                    "{what} did not exit within {timeout:?}"
                )));
            }
            Err(source) => {
                return Err(HarnessError::Io {
                    what: format!("waiting for {what}"),
                    source,
                })
            }
        }
    }
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Processes whose command line mentions `needle` (to find leftovers of a VM by its directory).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Median of a non-empty sample (upper median for even counts).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Whether this runs inside the project's nested test host (L1 under TCG): its kernel says so.
pub fn in_nested_testhost() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .is_ok_and(|r| r.trim().ends_with("-husk-l1"))
}

/// The two ways a guest CPU dies under the nested test host's emulated SVM, seen with QEMU's
/// guests as well as ours (a silent early exit of a QEMU guest, L1's own kernel oopsing in timer
/// code): a triple fault with no panic message, or a vCPU that stops answering while its thread is
/// inside KVM_RUN. Returns the evidence if `exit`/`stderr`/`console`/`threads` (see
/// [`VmProcess::thread_dump`]) show one of them, and only inside the test host: on real
/// hardware either would be a Husk bug.
pub fn nested_cpu_fault(
    exit: Option<ExitStatus>,
    stderr: &str,
    console: &str,
    threads: &str,
) -> Option<String> {
    if !in_nested_testhost() {
        return None;
    }
    cpu_fault_evidence(exit.and_then(|s| s.code()), stderr, console, threads)
}

fn cpu_fault_evidence(
    exit_code: Option<i32>,
    stderr: &str,
    console: &str,
    threads: &str,
) -> Option<String> {
    if exit_code == Some(3) {
        if let Some(line) = stderr.lines().find(|l| l.contains("triple-faulted")) {
            return Some(line.trim().to_string());
        }
    }
    let stall = console
        .lines()
        .find(|l| l.contains("detected stalls on CPUs"))?;
    let vcpus: Vec<&str> = threads.lines().filter(|l| l.contains(" vcpu")).collect();
    // Every vCPU thread runnable, in no blocking system call ("running") or in ioctl(KVM_RUN)
    // (16): the guest is stuck below the VMM, not waiting for it (a vCPU blocked on a VMM lock
    // would sleep in futex, 202).
    let in_kvm = |l: &&str| {
        l.contains("state=R") && (l.contains("syscall=running ") || l.contains("syscall=16 "))
    };
    (!vcpus.is_empty() && vcpus.iter().all(in_kvm)).then(|| {
        format!(
            "guest: {}; vCPU threads: {}",
            stall.trim(),
            vcpus.join(" | ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The evidence as it appeared in the test host on 2026-12-04.
    #[test]
    fn guest_cpu_faults_are_told_from_vmm_failures() {
        let stall =
            "rcu: INFO: rcu_sched detected stalls on CPUs/tasks:\nrcu: \t1-...0: (37 ticks)";
        let in_kvm = "197 husk-vmm state=S wchan=do_epoll_wait syscall=232 x\n\
                      206 vcpu0 state=R wchan= syscall=running last 1 s: user=0 sys=1 guest=99\n\
                      207 vcpu1 state=R wchan= syscall=running last 1 s: user=0 sys=0 guest=100\n";
        assert!(cpu_fault_evidence(None, "", stall, in_kvm)
            .is_some_and(|e| e.contains("detected stalls") && e.contains("vcpu1")));
        // A vCPU asleep on a VMM lock is our bug, not the emulation's.
        let blocked = in_kvm.replace(
            "207 vcpu1 state=R wchan= syscall=running",
            "207 vcpu1 state=S wchan=futex_wait_queue syscall=202",
        );
        assert_eq!(cpu_fault_evidence(None, "", stall, &blocked), None);
        assert_eq!(cpu_fault_evidence(None, "", "", in_kvm), None);
        let tf =
            "husk-vmm: guest triple-faulted on vCPU 0 (registers reset by KVM before the exit)";
        assert!(cpu_fault_evidence(Some(3), tf, "", "").is_some_and(|e| e.contains("vCPU 0")));
        assert_eq!(cpu_fault_evidence(Some(1), tf, "", ""), None);
        assert_eq!(cpu_fault_evidence(Some(0), "", "", ""), None);
    }

    #[test]
    fn median_and_rss() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 3.0);
        assert!(median(&[]).is_nan());
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
