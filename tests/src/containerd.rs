//! A private containerd for end-to-end tests: its own config, root, state and sockets in a fresh
//! temporary directory, so tests never touch (or depend on) a system containerd; `ctr` against it with
//! timeouts; and snapshots of what a runtime can leak (processes, mounts, runtime files).
//!
//! Meant for the test host (tests/testhost/run), where Debian's containerd 1.6 and runc are installed.
//! Shim sockets still land in /run/containerd/s: containerd 1.6 always puts them there.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::project_root;

/// The name `husk-rootfs-builder oci-image` gives the test image (`make images`).
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:latest";

/// Processes a runtime may leave behind, counted by [`LeakSnapshot`] (by executable file name).
pub const WATCHED_PROCESSES: &[&str] = &[
    "husk-vmm",
    "virtiofsd",
    "containerd-shim-husk-v2",
    "containerd-shim-runc-v2",
];

/// Where containerd 1.6 puts shim sockets, whatever its own state directory is.
pub const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// Husk's runtime state directory.
pub const HUSK_RUN_DIR: &str = "/run/husk";

/// How many lines of the containerd log errors include.
const LOG_TAIL_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{what} {path} is missing: {hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("cannot start {what}: {source} (containerd and ctr come with the test host: run through tests/testhost/run)")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("containerd exited ({status}) before it answered; log tail:\n{log_tail}")]
    Exited {
        status: ExitStatus,
        log_tail: String,
    },
    #[error("containerd did not answer `ctr version` within {timeout:?} (last: {last}); log tail:\n{log_tail}")]
    NotReady {
        timeout: Duration,
        last: String,
        log_tail: String,
    },
    #[error("`ctr {args}` did not finish within {timeout:?}\nstdout: {stdout}\nstderr: {stderr}\ncontainerd log tail:\n{log_tail}")]
    CtrTimeout {
        args: String,
        timeout: Duration,
        stdout: String,
        stderr: String,
        log_tail: String,
    },
    #[error("`ctr {args}` failed ({status})\nstdout: {stdout}\nstderr: {stderr}\ncontainerd log tail:\n{log_tail}")]
    CtrFailed {
        args: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
        log_tail: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerdError {
    let what = what.into();
    move |source| ContainerdError::Io { what, source }
}

/// How to start containerd.
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// Directories put first on containerd's PATH, in this order: containerd finds shims
    /// (`containerd-shim-<name>-v2`) there, e.g. target/release for `containerd-shim-husk-v2`.
    pub extra_path: Vec<PathBuf>,
    /// Extra environment for containerd; shims inherit it (e.g. `HUSK_CONFIG=/path/config.toml`).
    pub env: Vec<(String, String)>,
    /// Load the CRI plugin (disabled by default: `ctr` does not need it and it wants CNI and a pause
    /// image). When enabled it gets a `runc` runtime with `SystemdCgroup = false`, CNI from
    /// /usr/lib/cni with its config directory in the temporary directory.
    pub enable_cri: bool,
    /// With `enable_cri`: the pod sandbox ("pause") image, which must be imported into the `k8s.io`
    /// namespace before the first pod (containerd 1.6 defaults to registry.k8s.io/pause:3.6, which
    /// the test host cannot pull).
    pub sandbox_image: Option<String>,
    /// With `enable_cri`: a CNI network configuration list (JSON) written to the CNI config
    /// directory before containerd starts.
    pub cni_conflist: Option<String>,
    /// TOML appended verbatim to the generated config (e.g. a runtime section); it must not repeat
    /// the tables the generated part already has (`[grpc]`, `[ttrpc]`, `[debug]`, and the CRI ones
    /// when `enable_cri`).
    pub extra_config: String,
    /// containerd's log level (`debug` shows every shim call).
    pub log_level: String,
    /// How long containerd may take to answer `ctr version`.
    pub start_timeout: Duration,
    /// Timeout of [`Containerd::ctr`] (the `_with` variant takes its own).
    pub ctr_timeout: Duration,
    /// The binaries (looked up on PATH when not absolute).
    pub containerd_bin: PathBuf,
    pub ctr_bin: PathBuf,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        ContainerdOptions {
            extra_path: Vec::new(),
            env: Vec::new(),
            enable_cri: false,
            sandbox_image: None,
            cni_conflist: None,
            extra_config: String::new(),
            log_level: "info".into(),
            // Generous: inside the nested test host everything runs under software emulation.
            start_timeout: Duration::from_secs(60),
            ctr_timeout: Duration::from_secs(180),
            containerd_bin: "containerd".into(),
            ctr_bin: "ctr".into(),
        }
    }
}

/// A running private containerd. Dropping it removes the containers it still has, stops it
/// (SIGTERM, then SIGKILL) and removes its directory as far as it can.
pub struct Containerd {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    address: PathBuf,
    ctr_bin: PathBuf,
    ctr_timeout: Duration,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("dir", &self.dir_path)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl Containerd {
    /// Writes the config, starts containerd and waits until `ctr version` answers.
    pub fn start(opts: &ContainerdOptions) -> Result<Containerd, ContainerdError> {
        let dir = tempfile::Builder::new()
            .prefix("husk-containerd-")
            .tempdir()
            .map_err(io_err("creating the containerd directory"))?;
        let dir_path = dir.path().to_path_buf();
        let address = dir_path.join("containerd.sock");
        let config_path = dir_path.join("config.toml");
        std::fs::write(&config_path, config_toml(&dir_path, opts))
            .map_err(io_err(format!("writing {}", config_path.display())))?;
        if let (true, Some(conflist)) = (opts.enable_cri, &opts.cni_conflist) {
            let cni = dir_path.join("cni");
            std::fs::create_dir_all(&cni)
                .and_then(|()| std::fs::write(cni.join("10-husk-test.conflist"), conflist))
                .map_err(io_err(format!(
                    "writing the CNI config in {}",
                    cni.display()
                )))?;
        }
        let log_path = dir_path.join("containerd.log");
        let log =
            File::create(&log_path).map_err(io_err(format!("creating {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_err("duplicating the log file"))?;

        let mut path = std::env::join_paths(&opts.extra_path)
            .map_err(|e| ContainerdError::Io {
                what: "extra_path".into(),
                source: std::io::Error::other(e),
            })?
            .into_string()
            .unwrap_or_default();
        let inherited = std::env::var("PATH").unwrap_or_else(|_| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        if !path.is_empty() {
            path.push(':');
        }
        path.push_str(&inherited);

        let mut cmd = Command::new(&opts.containerd_bin);
        cmd.arg("--config")
            .arg(&config_path)
            .env("PATH", &path)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = cmd.spawn().map_err(|source| ContainerdError::Spawn {
            what: opts.containerd_bin.display().to_string(),
            source,
        })?;
        let mut c = Containerd {
            child: Some(child),
            dir: Some(dir),
            dir_path,
            address,
            ctr_bin: opts.ctr_bin.clone(),
            ctr_timeout: opts.ctr_timeout,
        };
        c.wait_ready(opts.start_timeout)?;
        Ok(c)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), ContainerdError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not tried");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(ContainerdError::Exited {
                        status,
                        log_tail: self.log_tail(LOG_TAIL_LINES),
                    });
                }
            }
            // The socket appears before the services are registered: only an answer counts.
            if self.address.exists() {
                match self.ctr_raw(None, &["version"], None, Duration::from_secs(10)) {
                    Ok(o) if o.status.success() => return Ok(()),
                    Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(ContainerdError::NotReady {
                    timeout,
                    last,
                    log_tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The temporary directory holding config, root, state, sockets and log.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// containerd's gRPC socket (`ctr -a`).
    pub fn address(&self) -> &Path {
        &self.address
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir_path.join("config.toml")
    }

    pub fn root(&self) -> PathBuf {
        self.dir_path.join("root")
    }

    pub fn state(&self) -> PathBuf {
        self.dir_path.join("state")
    }

    /// containerd's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir_path.join("containerd.log")
    }

    /// The last `lines` lines of the containerd log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// containerd's process id (None once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `ctr -a SOCK -n NAMESPACE ARGS...` with stdin from /dev/null and the default timeout. A non-zero
    /// exit is not an error here (tests check exit codes); see [`Containerd::ctr_ok`].
    pub fn ctr<I, S>(&self, namespace: &str, args: I) -> Result<Output, ContainerdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctr_with(namespace, args, None, self.ctr_timeout)
    }

    /// Like [`Containerd::ctr`], with bytes on ctr's standard input (closed as `stdin` says) and its
    /// own timeout (ctr is killed when it passes).
    pub fn ctr_with<I, S>(
        &self,
        namespace: &str,
        args: I,
        stdin: Option<Stdin<'_>>,
        timeout: Duration,
    ) -> Result<Output, ContainerdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        self.ctr_raw(Some(namespace), &args, stdin, timeout)
    }

    /// Whether `ctr tasks ls` shows `id` as RUNNING in `namespace`.
    pub fn task_running(&self, namespace: &str, id: &str) -> bool {
        self.ctr_raw(
            Some(namespace),
            &["tasks", "ls"],
            None,
            Duration::from_secs(30),
        )
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&id) && f.get(2) == Some(&"RUNNING")
            })
        })
        .unwrap_or(false)
    }

    /// Whether `ctr tasks ps container` lists a process of exec `exec_id` (the runc shim reports exec
    /// ids as `ProcessDetails{ExecID:...}` in the process info).
    pub fn exec_running(&self, namespace: &str, container: &str, exec_id: &str) -> bool {
        let needle = format!("ExecID:{exec_id},");
        self.ctr_raw(
            Some(namespace),
            &["tasks", "ps", container],
            None,
            Duration::from_secs(30),
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&needle))
        .unwrap_or(false)
    }

    /// Like [`Containerd::ctr`], but a non-zero exit is an error (with the output and the log tail).
    pub fn ctr_ok<I, S>(&self, namespace: &str, args: I) -> Result<Output, ContainerdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.ctr_raw(Some(namespace), &args, None, self.ctr_timeout)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(ContainerdError::CtrFailed {
                args: join_args(Some(namespace), &args),
                status: out.status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                log_tail: self.log_tail(LOG_TAIL_LINES),
            })
        }
    }

    /// `ctr images import` of an OCI or Docker archive into `namespace`, unpacked for the default
    /// snapshotter.
    pub fn import_image(&self, namespace: &str, tar: &Path) -> Result<(), ContainerdError> {
        if !tar.is_file() {
            return Err(ContainerdError::Missing {
                what: "image archive",
                path: tar.to_path_buf(),
                hint: "run 'make images'",
            });
        }
        self.ctr_ok(
            namespace,
            [OsStr::new("images"), OsStr::new("import"), tar.as_os_str()],
        )
        .map(|_| ())
    }

    fn ctr_raw<S: AsRef<OsStr>>(
        &self,
        namespace: Option<&str>,
        args: &[S],
        stdin: Option<Stdin<'_>>,
        timeout: Duration,
    ) -> Result<Output, ContainerdError> {
        let mut cmd = Command::new(&self.ctr_bin);
        cmd.arg("-a").arg(&self.address);
        if let Some(ns) = namespace {
            cmd.arg("-n").arg(ns);
        }
        cmd.args(args);
        let shown = || join_args(namespace, args);
        let data = stdin.as_ref().map(|s| s.data);
        let started = Instant::now();
        let close = stdin.map(|s| s.close);
        // Polled by run_with_timeout until it says stdin may be closed.
        let mut may_close = || match &close {
            None | Some(CloseStdin::AfterWrite) => true,
            Some(CloseStdin::After(d)) => started.elapsed() >= *d,
            Some(CloseStdin::WhenTaskRunning(id)) => {
                namespace.is_some_and(|ns| self.task_running(ns, id))
            }
            Some(CloseStdin::WhenExecRunning { container, exec_id }) => {
                namespace.is_some_and(|ns| self.exec_running(ns, container, exec_id))
            }
        };
        run_with_timeout(cmd, data, &mut may_close, timeout).map_err(|e| match e {
            RunError::Spawn(source) => ContainerdError::Spawn {
                what: self.ctr_bin.display().to_string(),
                source,
            },
            RunError::Io(source) => ContainerdError::Io {
                what: format!("running ctr {}", shown()),
                source,
            },
            RunError::Timeout { stdout, stderr } => ContainerdError::CtrTimeout {
                args: shown(),
                timeout,
                stdout,
                stderr,
                log_tail: self.log_tail(LOG_TAIL_LINES),
            },
        })
    }

    /// Best effort: deletes every task (killing it first) and every container in every namespace, so
    /// that their shims exit and their rootfs mounts go away.
    pub fn remove_all_containers(&self) {
        let t = Duration::from_secs(60);
        let lines = |ns: Option<&str>, args: &[&str]| -> Vec<String> {
            self.ctr_raw(ns, args, None, t)
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        for ns in lines(None, &["namespaces", "ls", "-q"]) {
            let ns = Some(ns.as_str());
            for task in lines(ns, &["tasks", "ls", "-q"]) {
                // A paused task cannot take SIGKILL until it is thawed.
                let _ = self.ctr_raw(ns, &["tasks", "resume", &task], None, t);
                let _ = self.ctr_raw(ns, &["tasks", "delete", "--force", &task], None, t);
            }
            for c in lines(ns, &["containers", "ls", "-q"]) {
                let _ = self.ctr_raw(ns, &["containers", "delete", &c], None, t);
            }
        }
    }

    /// Stops containerd: SIGTERM, then SIGKILL after 10 s. Containers still present are removed first
    /// (see [`Containerd::remove_all_containers`]). Returns containerd's exit status; idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if matches!(child.try_wait(), Ok(None)) {
            self.remove_all_containers();
            // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        child.wait().ok()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        // Whatever a failed test left mounted below our directory would make its removal fail.
        for m in mounts_below(&self.dir_path) {
            if let Ok(c) = std::ffi::CString::new(m.into_os_string().into_encoded_bytes()) {
                // SAFETY: umount2 with a valid NUL-terminated path; errors are ignored (best effort).
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// Bytes for ctr's standard input, and when to close it.
#[derive(Debug, Clone, Copy)]
pub struct Stdin<'a> {
    pub data: &'a [u8],
    pub close: CloseStdin<'a>,
}

/// When the harness closes ctr's stdin after writing the data.
///
/// ctr 1.6 forwards the end of its stdin to the task (CloseIO) only if that end comes after the task
/// or exec process was created: it installs its close hook once `NewTask`/`Exec` returned, and an
/// earlier EOF is dropped, leaving e.g. `cat` waiting forever. So for `ctr run` hold stdin open until
/// the task runs, for `ctr tasks exec` until the exec process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseStdin<'a> {
    /// Right after the data is written (for commands that read stdin themselves).
    AfterWrite,
    /// Once `ctr tasks ls` shows this container's task RUNNING.
    WhenTaskRunning(&'a str),
    /// Once `ctr tasks ps CONTAINER` lists this exec id.
    WhenExecRunning {
        container: &'a str,
        exec_id: &'a str,
    },
    /// After this long from the start of ctr.
    After(Duration),
}

impl<'a> Stdin<'a> {
    /// Stdin for `ctr run ... ID`: closed once task `id` runs.
    pub fn for_run(data: &'a [u8], id: &'a str) -> Self {
        Stdin {
            data,
            close: CloseStdin::WhenTaskRunning(id),
        }
    }

    /// Stdin for `ctr tasks exec --exec-id EXEC_ID CONTAINER ...`: closed once the exec process runs.
    pub fn for_exec(data: &'a [u8], container: &'a str, exec_id: &'a str) -> Self {
        Stdin {
            data,
            close: CloseStdin::WhenExecRunning { container, exec_id },
        }
    }
}

/// The containerd config (version 2) for a private instance living in `dir`.
pub fn config_toml(dir: &Path, opts: &ContainerdOptions) -> String {
    let d = dir.display();
    let mut s = String::new();
    let disabled = if opts.enable_cri {
        String::new()
    } else {
        "\"io.containerd.grpc.v1.cri\"".to_string()
    };
    let _ = write!(
        s,
        r#"# Written by husk-tests (tests/src/containerd.rs): a private containerd for one test run.
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{disabled}]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "{level}"

# The opt plugin would otherwise create /opt/containerd and put its bin/ first on the shims' PATH.
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        level = opts.log_level,
    );
    if opts.enable_cri {
        let sandbox_image = opts
            .sandbox_image
            .as_ref()
            .map(|i| format!("  sandbox_image = {i:?}\n"))
            .unwrap_or_default();
        // No systemd in the test host (its cgroup v2 tree is mounted by l1-init): cgroupfs driver.
        let _ = write!(
            s,
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
{sandbox_image}  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
"#
        );
    }
    if !opts.extra_config.is_empty() {
        s.push('\n');
        s.push_str(&opts.extra_config);
        s.push('\n');
    }
    s
}

/// Checks that the shim is built and writes a Husk shim configuration (`HUSK_CONFIG`) into `dir` for
/// the project's build: the guest
/// kernel and read-only root image, husk-vmm, and virtiofsd from build/testhost; the guest console kept
/// and debug logs, for failures. Returns its path.
pub fn husk_shim_config(dir: &Path, a: &crate::Artifacts) -> Result<PathBuf, ContainerdError> {
    let shim = project_root().join("target/release/containerd-shim-husk-v2");
    if !shim.is_file() {
        return Err(ContainerdError::Missing {
            what: "containerd-shim-husk-v2",
            path: shim,
            hint: "run 'make build'",
        });
    }
    let virtiofsd = project_root().join("build/testhost/virtiofsd");
    if !virtiofsd.is_file() {
        return Err(ContainerdError::Missing {
            what: "virtiofsd",
            path: virtiofsd,
            hint: "run 'make testhost'",
        });
    }
    let config = dir.join("husk.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\nrootfs = {:?}\ninitrd = \"\"\nvmm = {:?}\nvirtiofsd = {:?}\n\
             debug_console = true\nlog_level = \"debug\"\n",
            a.kernel, a.rootfs, a.vmm, virtiofsd
        ),
    )
    .map_err(io_err(format!("writing {}", config.display())))?;
    Ok(config)
}

/// The test image archive that `make images` builds.
pub fn busybox_image_tar() -> Result<PathBuf, ContainerdError> {
    let p = project_root().join("build/images/busybox-oci.tar");
    if p.is_file() {
        return Ok(p);
    }
    // Built here the way `make images` does when a make target running the tests did not ask for
    // it: it takes a moment and the bytes are the same.
    build_busybox_image(BUSYBOX_IMAGE, "sh", &p)
}

/// Builds a busybox OCI image archive named `name` whose default command is `cmd` (split on spaces)
/// with `husk-rootfs-builder oci-image`, e.g. a pod sandbox ("pause") image for the CRI.
pub fn build_busybox_image(name: &str, cmd: &str, out: &Path) -> Result<PathBuf, ContainerdError> {
    let builder = project_root().join("target/release/husk-rootfs-builder");
    let missing = || ContainerdError::Missing {
        what: "busybox OCI image",
        path: out.to_path_buf(),
        hint: "run 'make build images' (needs /bin/busybox from busybox-static)",
    };
    if !builder.is_file() || !Path::new("/bin/busybox").is_file() {
        return Err(missing());
    }
    let result = Command::new(&builder)
        .args(["oci-image", "--busybox", "/bin/busybox", "--name", name])
        .args(["--cmd", cmd, "--out"])
        .arg(out)
        .output()
        .map_err(|source| ContainerdError::Spawn {
            what: builder.display().to_string(),
            source,
        })?;
    if result.status.success() && out.is_file() {
        Ok(out.to_path_buf())
    } else {
        eprintln!(
            "husk-rootfs-builder oci-image failed: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        Err(missing())
    }
}

fn join_args<S: AsRef<OsStr>>(namespace: Option<&str>, args: &[S]) -> String {
    let mut v: Vec<String> = namespace
        .map(|ns| vec!["-n".to_string(), ns.to_string()])
        .unwrap_or_default();
    v.extend(
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned()),
    );
    v.join(" ")
}

enum RunError {
    Spawn(std::io::Error),
    Io(std::io::Error),
    Timeout { stdout: String, stderr: String },
}

/// Runs `cmd` with piped stdio: writes `stdin` and closes it once `may_close` (polled) says so or the
/// command exited, collects stdout and stderr, kills it after `timeout`.
fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    may_close: &mut dyn FnMut() -> bool,
    timeout: Duration,
) -> Result<Output, RunError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let collect = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let out_rx = collect(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err_rx = collect(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    // The writer closes stdin when `release` is dropped (or signalled).
    let mut release = None;
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        let (tx, rx) = mpsc::channel::<()>();
        release = Some(tx);
        // On a thread: a child that does not read must not block us past the timeout. EPIPE (the
        // child exited without reading everything) is not our error.
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
            let _ = rx.recv();
        });
    }
    let deadline = Instant::now() + timeout;
    let mut next_poll = Instant::now();
    let status = loop {
        if release.is_some() && Instant::now() >= next_poll {
            if may_close() {
                release = None;
            }
            next_poll = Instant::now() + Duration::from_millis(100);
        }
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::Io(e));
            }
        }
    };
    // A grandchild could hold the pipes open: do not wait for the readers forever.
    let grace = Duration::from_secs(5);
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(RunError::Timeout {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
    }
}

/// One line of /proc/self/mountinfo reduced to what identifies a mount across time (mount ids and
/// peer groups change when something is remounted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MountEntry {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
}

impl std::fmt::Display for MountEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} from {})",
            self.mount_point, self.fs_type, self.source
        )
    }
}

/// Parses mountinfo text: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER`.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = unescape_mountinfo(pre.split(' ').nth(4)?);
            let mut post = post.split(' ');
            Some(MountEntry {
                mount_point,
                fs_type: post.next()?.to_string(),
                source: unescape_mountinfo(post.next().unwrap_or("")),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = parse_mountinfo(&text)
        .into_iter()
        .map(|m| PathBuf::from(m.mount_point))
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first, so that nested mounts go before their parents.
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// What a runtime can leave behind, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeakSnapshot {
    /// Pids of the [`WATCHED_PROCESSES`], by executable name (every watched name is a key).
    pub processes: BTreeMap<String, Vec<u32>>,
    /// The mounts of this process's mount namespace (sorted).
    pub mounts: Vec<MountEntry>,
    /// Paths below /run/husk, relative to it (recursive, sorted).
    pub husk_run: Vec<String>,
    /// Entries of /run/containerd/s (shim sockets, sorted).
    pub shim_sockets: Vec<String>,
}

impl LeakSnapshot {
    pub fn take() -> LeakSnapshot {
        let mut processes: BTreeMap<String, Vec<u32>> = WATCHED_PROCESSES
            .iter()
            .map(|n| (n.to_string(), Vec::new()))
            .collect();
        for (pid, name) in process_names() {
            if let Some(v) = processes.get_mut(&name) {
                v.push(pid);
            }
        }
        let mut mounts =
            parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
        mounts.sort();
        let mut husk_run = Vec::new();
        list_tree(
            Path::new(HUSK_RUN_DIR),
            Path::new(HUSK_RUN_DIR),
            6,
            &mut husk_run,
        );
        husk_run.sort();
        let mut shim_sockets: Vec<String> = std::fs::read_dir(SHIM_SOCKET_DIR)
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        shim_sockets.sort();
        LeakSnapshot {
            processes,
            mounts,
            husk_run,
            shim_sockets,
        }
    }

    /// Process count for one executable name.
    pub fn count(&self, name: &str) -> usize {
        self.processes.get(name).map_or(0, Vec::len)
    }

    /// Takes snapshots until nothing is new compared with `before` or `timeout` passes (shims and
    /// their sockets go away a moment after the container is deleted). Returns the last
    /// [`LeakSnapshot::diff`]: empty when nothing leaked.
    pub fn wait_for_no_leaks(before: &LeakSnapshot, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let d = LeakSnapshot::diff(before, &LeakSnapshot::take());
            if d.is_empty() || Instant::now() >= deadline {
                return d;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What `after` has that `before` had not, one line each; empty when nothing leaked.
    pub fn diff(before: &LeakSnapshot, after: &LeakSnapshot) -> Vec<String> {
        let mut out = Vec::new();
        for (name, pids) in &after.processes {
            let old = before.processes.get(name).map(Vec::as_slice).unwrap_or(&[]);
            let new: Vec<u32> = pids.iter().copied().filter(|p| !old.contains(p)).collect();
            if pids.len() > old.len() || !new.is_empty() {
                let shown: Vec<String> = new
                    .iter()
                    .map(|p| format!("{p} [{}]", cmdline(*p)))
                    .collect();
                out.push(format!(
                    "process {name}: {} before, {} after; new: {}",
                    old.len(),
                    pids.len(),
                    shown.join(", ")
                ));
            }
        }
        for m in multiset_minus(&after.mounts, &before.mounts) {
            out.push(format!("mount {m}"));
        }
        for f in multiset_minus(&after.husk_run, &before.husk_run) {
            out.push(format!("file {HUSK_RUN_DIR}/{f}"));
        }
        for f in multiset_minus(&after.shim_sockets, &before.shim_sockets) {
            out.push(format!("shim socket {SHIM_SOCKET_DIR}/{f}"));
        }
        out
    }
}

/// Items of `a` not matched one-for-one by items of `b`.
fn multiset_minus<'a, T: Ord>(a: &'a [T], b: &[T]) -> Vec<&'a T> {
    let mut left: BTreeMap<&T, usize> = BTreeMap::new();
    for x in b {
        *left.entry(x).or_default() += 1;
    }
    a.iter()
        .filter(|x| match left.get_mut(x) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .collect()
}

fn list_tree(root: &Path, dir: &Path, depth: usize, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
        // Not following symlinks: a link out of /run/husk is an entry, not a subtree.
        if depth > 1 && e.file_type().is_ok_and(|t| t.is_dir()) {
            list_tree(root, &p, depth - 1, out);
        }
    }
}

/// (pid, executable file name) of every process that can be inspected. The name comes from the
/// /proc/PID/exe link (comm is cut at 15 bytes: both shims would read `containerd-shim`), else from
/// argv[0].
fn process_names() -> Vec<(u32, String)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let from_exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|p| {
                    let name = p.file_name()?.to_string_lossy().into_owned();
                    Some(name.trim_end_matches(" (deleted)").to_string())
                });
            let name = from_exe.or_else(|| {
                let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let argv0 = c.split(|b| *b == 0).next()?;
                let argv0 = Path::new(OsStr::new(std::str::from_utf8(argv0).ok()?));
                Some(argv0.file_name()?.to_string_lossy().into_owned())
            })?;
            Some((pid, name))
        })
        .collect()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .trim_end_matches('\0')
                .replace('\0', " ")
        })
        .unwrap_or_else(|_| "gone".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_private_paths_and_disables_cri_by_default() {
        let dir = Path::new("/tmp/husk-containerd-x");
        let opts = ContainerdOptions {
            extra_config: "[plugins.\"io.containerd.runtime.v1.linux\"]\n  shim_debug = true"
                .into(),
            ..Default::default()
        };
        let c = config_toml(dir, &opts);
        assert!(c.contains("version = 2\n"));
        assert!(c.contains("root = \"/tmp/husk-containerd-x/root\""));
        assert!(c.contains("state = \"/tmp/husk-containerd-x/state\""));
        assert!(c.contains("address = \"/tmp/husk-containerd-x/containerd.sock\""));
        assert!(c.contains("address = \"/tmp/husk-containerd-x/containerd.sock.ttrpc\""));
        assert!(c.contains("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]"));
        assert!(c.contains("path = \"/tmp/husk-containerd-x/opt\""));
        assert!(c.ends_with("shim_debug = true\n"));
        assert!(!c.contains("/run/containerd"));

        let cri = config_toml(
            dir,
            &ContainerdOptions {
                enable_cri: true,
                ..Default::default()
            },
        );
        assert!(cri.contains("disabled_plugins = []"));
        assert!(cri.contains("SystemdCgroup = false"));
        assert!(!cri.contains("sandbox_image"));
        let pause = config_toml(
            dir,
            &ContainerdOptions {
                enable_cri: true,
                sandbox_image: Some("husk.test/pause:1".into()),
                ..Default::default()
            },
        );
        assert!(pause.contains("  sandbox_image = \"husk.test/pause:1\"\n"));
    }

    #[test]
    fn mountinfo_parsing_and_unescaping() {
        let text = "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
                    98 30 0:50 / /run/a\\040b rw - overlay overlay rw,lowerdir=x\n\
                    bad line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0],
            MountEntry {
                mount_point: "/proc".into(),
                fs_type: "proc".into(),
                source: "proc".into()
            }
        );
        assert_eq!(m[1].mount_point, "/run/a b");
        assert_eq!(m[1].fs_type, "overlay");
    }

    #[test]
    fn diff_reports_only_what_is_new() {
        let mount = |p: &str| MountEntry {
            mount_point: p.into(),
            fs_type: "overlay".into(),
            source: "overlay".into(),
        };
        let mut before = LeakSnapshot::default();
        before.processes.insert("husk-vmm".into(), vec![10]);
        before.mounts = vec![mount("/a"), mount("/b")];
        before.shim_sockets = vec!["s1".into()];
        let mut after = before.clone();
        assert!(LeakSnapshot::diff(&before, &after).is_empty());

        // Gone things are not leaks; a process replaced by another with the same name is.
        after.processes.insert("husk-vmm".into(), vec![4_000_000]);
        after.mounts = vec![mount("/a"), mount("/b"), mount("/b"), mount("/c")];
        after.shim_sockets = vec![];
        after.husk_run = vec!["pod1".into(), "pod1/vsock.sock".into()];
        let d = LeakSnapshot::diff(&before, &after);
        assert_eq!(d.len(), 5, "{d:#?}");
        assert!(d[0].starts_with("process husk-vmm: 1 before, 1 after; new: 4000000"));
        assert_eq!(d[1], "mount /b (overlay from overlay)");
        assert_eq!(d[2], "mount /c (overlay from overlay)");
        assert_eq!(d[3], "file /run/husk/pod1");
        // The other way round: pid 10 and socket s1 are new.
        assert_eq!(LeakSnapshot::diff(&after, &before).len(), 2);
    }

    #[test]
    fn snapshot_sees_this_process_mounts() {
        let s = LeakSnapshot::take();
        assert!(s.mounts.iter().any(|m| m.mount_point == "/"));
        assert_eq!(s.processes.len(), WATCHED_PROCESSES.len());
        assert!(process_names()
            .iter()
            .any(|(pid, _)| *pid == std::process::id()));
    }

    #[test]
    fn run_with_timeout_feeds_stdin_and_kills_on_timeout() {
        let mut cat = Command::new("cat");
        cat.arg("-");
        let mut polls = 0;
        let t = Instant::now();
        let out = run_with_timeout(
            cat,
            Some(b"hello"),
            &mut || {
                polls += 1;
                polls == 3
            },
            Duration::from_secs(30),
        )
        .unwrap_or_else(|_| panic!("cat failed"));
        assert_eq!(out.stdout, b"hello");
        assert!(out.status.success());
        // cat only ends at EOF: stdin was held open until the third poll.
        assert_eq!(polls, 3);
        assert!(t.elapsed() >= Duration::from_millis(200));

        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let t = Instant::now();
        assert!(matches!(
            run_with_timeout(sleep, None, &mut || true, Duration::from_millis(200)),
            Err(RunError::Timeout { .. })
        ));
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
