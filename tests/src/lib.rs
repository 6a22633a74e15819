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
    #[error("husk-vmm exited ({status}) before the agent answered; its stderr:\n{stderr}")]
    VmmExited { status: ExitStatus, stderr: String },
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
    pub async fn connect_agent(&mut self, timeout: Duration) -> Result<AgentClient, HarnessError> {
        let opts = ClientOptions {
            retry_initial_backoff: Duration::from_millis(5),
            retry_max_backoff: Duration::from_millis(50),
            ..Default::default()
        };
        self.connect_agent_with(opts, timeout).await
    }

    /// [`Self::connect_agent`] with the client's options (per-call deadlines, backoff). Stops
    /// waiting as soon as the VMM exits: a guest that died does not cost the whole `timeout`.
    pub async fn connect_agent_with(
        &mut self,
        opts: ClientOptions,
        timeout: Duration,
    ) -> Result<AgentClient, HarnessError> {
        let deadline = Instant::now() + timeout;
        let path = self.vsock_path();
        let connect = async {
            // The socket appears once the VMM has set up its devices.
            while !path.exists() {
                if Instant::now() > deadline {
                    return Err(HarnessError::Timeout(format!(
                        "{} never appeared",
                        path.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(AgentClient::connect_with_retry(&path, AGENT_VSOCK_PORT, opts, deadline).await?)
        };
        let child = &mut self.child;
        let exit = async {
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let result = match tokio::select! {
            r = connect => Ok(r),
            status = exit => Err(status),
        } {
            Ok(r) => r,
            Err(status) => Err(HarnessError::VmmExited {
                status,
                stderr: self.stderr(),
            }),
        };
        if let Err(HarnessError::Timeout(what)) = result {
            return Err(HarnessError::Timeout(format!(
                "{what}; console:\n{}",
                self.console()
            )));
        }
        result
    }

    /// After a failed test: how the VMM ended (a VMM whose guest just died gets 2 s to exit),
    /// where its threads are, where the vCPUs of a guest still running are (needs the control
    /// socket; `rip` named from `kernel`'s symbols), the console and stderr. Kills the VMM.
    /// Returns the report and, if the guest CPU died under nested emulation, the evidence (see
    /// [`nested_cpu_fault`]).
    pub fn post_mortem(&mut self, kernel: &Path) -> (String, Option<String>) {
        let exited = self.exited().or_else(|| {
            std::thread::sleep(Duration::from_secs(2));
            self.exited()
        });
        let threads = self.thread_dump();
        let vcpus = if exited.is_none() {
            let syms = KernelSymbols::load(kernel).ok();
            self.vcpu_samples(5, Duration::from_millis(300), syms.as_ref())
        } else {
            String::new()
        };
        self.kill();
        let (console, stderr) = (self.console(), self.stderr());
        let report = format!(
            "--- husk-vmm: {}\n--- husk-vmm threads:\n{threads}--- guest vCPUs:\n{vcpus}--- guest console:\n{console}\n--- husk-vmm stderr:\n{stderr}",
            exited.map_or("still running when the test failed".into(), |s| format!("exited: {s}")),
        );
        let fault = nested_cpu_fault(exited, &stderr, &console, &threads);
        (report, fault)
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

    /// Like [`Self::console_until`], but gives up as soon as the console stays silent for `quiet`:
    /// a guest that stopped making progress costs `quiet`, not the whole `timeout`.
    pub fn console_until_quiet(
        &mut self,
        needle: &str,
        timeout: Duration,
        quiet: Duration,
    ) -> Result<Vec<String>, HarnessError> {
        let rx = self
            .console_lines
            .as_ref()
            .ok_or_else(|| HarnessError::Timeout("console is not piped".into()))?;
        let mut lines = Vec::new();
        read_lines_until(rx, needle, timeout, quiet, |_, line| lines.push(line))?;
        Ok(lines)
    }

    /// Hands every console line to `each`, up to and including the first containing `needle`.
    fn read_console(
        &mut self,
        needle: &str,
        timeout: Duration,
        each: impl FnMut(Instant, String),
    ) -> Result<(), HarnessError> {
        let rx = self
            .console_lines
            .as_ref()
            .ok_or_else(|| HarnessError::Timeout("console is not piped".into()))?;
        read_lines_until(rx, needle, timeout, timeout, each)
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

    /// Where the guest's vCPUs are: `samples` times, `every` apart, pauses the VM, reads the
    /// registers each vCPU left as it parked (control socket `vcpus`) and resumes it. One line per
    /// vCPU and sample, with `rip` named from the guest kernel's symbols when `syms` has them. A
    /// guest spinning in one place shows the same function every time. Needs the control socket.
    pub fn vcpu_samples(
        &self,
        samples: usize,
        every: Duration,
        syms: Option<&KernelSymbols>,
    ) -> String {
        let mut out = String::new();
        // KVM's counters of each vCPU in the first and the last sample.
        let mut first: Vec<serde_json::Value> = Vec::new();
        let mut last: Vec<serde_json::Value> = Vec::new();
        let started = Instant::now();
        for i in 0..samples {
            if i > 0 {
                std::thread::sleep(every);
            }
            let answer = self
                .control(r#"{"op":"pause"}"#)
                .and_then(|_| self.control(r#"{"op":"vcpus"}"#));
            let _ = self.control(r#"{"op":"resume"}"#);
            match answer {
                Ok(v) => {
                    let vcpus = v["vcpus"].as_array().cloned().unwrap_or_default();
                    for c in &vcpus {
                        out.push_str(&format_vcpu(i, c, syms));
                    }
                    if v["ok"] != true {
                        out.push_str(&format!("sample {i}: {v}\n"));
                    }
                    if first.is_empty() {
                        first = vcpus.iter().map(|c| c["kvm_stats"].clone()).collect();
                    }
                    last = vcpus.iter().map(|c| c["kvm_stats"].clone()).collect();
                }
                Err(e) => out.push_str(&format!("sample {i}: {e}\n")),
            }
        }
        let span = started.elapsed();
        for (id, (a, b)) in first.iter().zip(&last).enumerate() {
            out.push_str(&format!(
                "vcpu{id} KVM counters that grew over {span:.1?}: {}\n",
                grown_counters(a, b)
            ));
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

/// The counters of `after` that grew since `before` (both `kvm_stats` objects of a `vcpus`
/// answer), largest growth first, at most 15.
fn grown_counters(before: &serde_json::Value, after: &serde_json::Value) -> String {
    let Some(after) = after.as_object() else {
        return "none reported".into();
    };
    let mut grown: Vec<(u64, &str)> = after
        .iter()
        .filter_map(|(name, v)| {
            let d = v
                .as_u64()?
                .checked_sub(before[name].as_u64().unwrap_or(0))?;
            (d > 0).then_some((d, name.as_str()))
        })
        .collect();
    grown.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    if grown.is_empty() {
        return "none".into();
    }
    grown
        .iter()
        .take(15)
        .map(|(d, n)| format!("{n} +{d}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line for one vCPU of a `vcpus` control answer.
fn format_vcpu(sample: usize, c: &serde_json::Value, syms: Option<&KernelSymbols>) -> String {
    let reg = |name: &str| {
        c[name]
            .as_str()
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
    };
    let rip = reg("rip").unwrap_or(0);
    let interrupts = match reg("rflags") {
        Some(f) if f & (1 << 9) != 0 => "on",
        Some(_) => "off",
        None => "?",
    };
    format!(
        "sample {sample} vcpu{} {} rip={rip:#x} {} interrupts={interrupts}{}\n",
        c["id"],
        c["mp_state"].as_str().unwrap_or("?"),
        syms.map_or_else(String::new, |s| s.name(rip)),
        c["error"]
            .as_str()
            .map_or_else(String::new, |e| format!(" error: {e}")),
    )
}

/// The function symbols of a guest kernel (vmlinux), to name guest addresses in failure reports.
pub struct KernelSymbols {
    /// (address, size, name), sorted by address.
    syms: Vec<(u64, u64, String)>,
}

impl KernelSymbols {
    pub fn load(vmlinux: &Path) -> Result<Self, HarnessError> {
        use object::{Object, ObjectSymbol, SymbolKind};
        let io = |what: &str| {
            let what = format!("{what} {}", vmlinux.display());
            move |e: std::io::Error| HarnessError::Io { what, source: e }
        };
        let data = std::fs::read(vmlinux).map_err(io("reading"))?;
        let elf = object::File::parse(&*data)
            .map_err(|e| io("parsing")(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let mut syms: Vec<(u64, u64, String)> = elf
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_owned())))
            .collect();
        syms.sort_unstable();
        Ok(Self { syms })
    }

    /// `function+0xoffset` for a kernel text address, `?` for one before the first symbol. An
    /// address past the end of the function before it (alignment padding: no code the kernel
    /// ever jumps to) says so.
    pub fn name(&self, addr: u64) -> String {
        match self.syms.partition_point(|(a, _, _)| *a <= addr) {
            0 => "?".into(),
            i => {
                let (start, size, name) = &self.syms[i - 1];
                let off = addr - start;
                if *size > 0 && off >= *size {
                    format!("{name}+{off:#x} (past its end: in no function)")
                } else {
                    format!("{name}+{off:#x}")
                }
            }
        }
    }
}

/// Hands every line from `rx` to `each`, up to and including the first containing `needle`. Fails
/// after `timeout` in all, after `quiet` without a line, or when the sender is gone (the process
/// closed its output); the error says which, with the lines seen so far.
pub fn read_lines_until(
    rx: &mpsc::Receiver<(Instant, String)>,
    needle: &str,
    timeout: Duration,
    quiet: Duration,
    mut each: impl FnMut(Instant, String),
) -> Result<(), HarnessError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(quiet)) {
            Ok((t, line)) => {
                let done = line.contains(needle);
                seen.push(line.clone());
                each(t, line);
                if done {
                    return Ok(());
                }
            }
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Disconnected => "the output closed".to_string(),
                    _ if Instant::now() >= deadline => format!("{timeout:?} passed"),
                    _ => format!("silent for {quiet:?}"),
                };
                return Err(HarnessError::Timeout(format!(
                    "no line containing {needle:?} ({why} after {:.0?}); got:\n{}",
                    start.elapsed(),
                    seen.join("\n")
                )));
            }
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

/// A failed run of a VM test: the panic, and the evidence if the guest CPU died under nested
/// emulation (see [`nested_cpu_fault`]).
pub type VmFailure = (Box<dyn std::any::Any + Send>, Option<String>);

/// Runs a VM test; runs it once more (in a new VM: `run` starts everything it needs) only if the
/// first run's guest CPU died under nested emulation. Any other failure, or a second one, fails
/// the test.
pub fn once_more_on_nested_cpu_fault(mut run: impl FnMut() -> Result<(), VmFailure>) {
    match run() {
        Ok(()) => {}
        Err((_, Some(fault))) => {
            eprintln!(
                "WARNING: the guest CPU failed under nested emulation ({fault}); running the \
                 test once more in a new VM"
            );
            if let Err((p, _)) = run() {
                std::panic::resume_unwind(p);
            }
        }
        Err((p, None)) => std::panic::resume_unwind(p),
    }
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

    #[inline(never)]
    fn a_function_to_find() -> u64 {
        std::hint::black_box(42)
    }

    #[test]
    fn kernel_symbols_name_addresses_of_an_elf_file() {
        // This test binary is an ELF file with symbols, like vmlinux.
        let syms = KernelSymbols::load(&std::env::current_exe().unwrap()).unwrap();
        // Look the function up by name (a PIE binary runs relocated, so not by its runtime address).
        let (start, _, _) = syms
            .syms
            .iter()
            .find(|(_, _, n)| n.contains("a_function_to_find"))
            .expect("the test function is in the symbol table")
            .clone();
        assert!(syms.name(start + 3).contains("a_function_to_find"));
        assert!(syms.name(start + 3).ends_with("+0x3"));
        assert_eq!(syms.name(0), "?");
        assert_eq!(a_function_to_find(), 42);
        assert!(KernelSymbols::load(Path::new("/nonexistent/vmlinux")).is_err());
    }

    #[test]
    fn vcpu_lines_name_the_function_and_the_interrupt_flag() {
        let syms = KernelSymbols {
            syms: vec![
                (0x1000, 0x40, "default_idle".into()),
                (0x2000, 0, "blk_mq_poll".into()),
            ],
        };
        let c =
            serde_json::json!({"id": 1, "mp_state": "halted", "rip": "0x1010", "rflags": "0x246"});
        assert_eq!(
            format_vcpu(2, &c, Some(&syms)),
            "sample 2 vcpu1 halted rip=0x1010 default_idle+0x10 interrupts=on\n"
        );
        let c =
            serde_json::json!({"id": 0, "mp_state": "runnable", "rip": "0x2001", "rflags": "0x46"});
        assert!(format_vcpu(0, &c, Some(&syms)).contains("blk_mq_poll+0x1 interrupts=off"));
        // Seen in the test host: a guest stuck at an address in the int3 padding after a function.
        assert_eq!(
            syms.name(0x1050),
            "default_idle+0x50 (past its end: in no function)"
        );
    }

    #[test]
    fn counters_that_grew_come_largest_first() {
        let before = serde_json::json!({"exits": 10, "pf_taken": 5, "halt_exits": 3});
        let after =
            serde_json::json!({"exits": 510, "pf_taken": 505, "halt_exits": 3, "new_one": 2});
        assert_eq!(
            grown_counters(&before, &after),
            "exits +500, pf_taken +500, new_one +2"
        );
        assert_eq!(grown_counters(&after, &after), "none");
        assert_eq!(
            grown_counters(&before, &serde_json::Value::Null),
            "none reported"
        );
    }

    #[test]
    fn reading_lines_stops_at_the_needle_at_silence_or_when_the_output_closes() {
        let (tx, rx) = mpsc::channel();
        for l in ["boot", "BENCH x", "BENCH-DONE", "after"] {
            tx.send((Instant::now(), l.to_string())).unwrap();
        }
        let mut got = Vec::new();
        let long = Duration::from_secs(60);
        read_lines_until(&rx, "BENCH-DONE", long, long, |_, l| got.push(l)).unwrap();
        assert_eq!(got, ["boot", "BENCH x", "BENCH-DONE"]);

        let e = read_lines_until(&rx, "never", long, Duration::from_millis(50), |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("silent for 50ms") && e.contains("after"), "{e}");
        let e = read_lines_until(&rx, "never", Duration::from_millis(30), long, |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("30ms passed"), "{e}");
        drop(tx);
        let e = read_lines_until(&rx, "never", long, long, |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("output closed"), "{e}");
    }

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
