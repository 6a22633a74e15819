//! A virtiofsd (vhost-user-fs daemon, build/testhost/virtiofsd from `make testhost`) serving one
//! directory to a test VM; killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{project_root, wait_child, HarnessError};

/// How long the daemon may take to create its socket (under nested emulation).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// The daemon binary, asserted to exist.
pub fn virtiofsd_binary() -> PathBuf {
    virtiofsd_path().unwrap_or_else(|e| panic!("{e}"))
}

/// The daemon binary, or why it is missing.
pub fn virtiofsd_path() -> Result<PathBuf, HarnessError> {
    let vfsd = project_root().join("build/testhost/virtiofsd");
    if !vfsd.is_file() {
        return Err(HarnessError::Missing {
            what: "virtiofsd",
            path: vfsd,
            hint: "run 'make testhost' (it installs virtiofsd)",
        });
    }
    Ok(vfsd)
}

/// A running virtiofsd with `--sandbox namespace`.
pub struct Virtiofsd {
    /// Stopping it early is part of some tests (the VMM must survive its daemon dying).
    pub child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Virtiofsd {
    /// Serves `shared` on `<dir>/<name>.sock` (log `<dir>/<name>.log`) with the given `--cache`
    /// policy, read-only if asked; returns once the socket exists. Panics on failure (tests).
    pub fn start(dir: &Path, shared: &Path, name: &str, cache: &str, readonly: bool) -> Virtiofsd {
        Self::try_start(dir, shared, name, cache, readonly).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::start`] for callers that report failures instead of panicking (benchmarks).
    pub fn try_start(
        dir: &Path,
        shared: &Path,
        name: &str,
        cache: &str,
        readonly: bool,
    ) -> Result<Virtiofsd, HarnessError> {
        let vfsd = virtiofsd_path()?;
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).map_err(|source| HarnessError::Io {
            what: format!("creating {}", log.display()),
            source,
        })?;
        let mut cmd = Command::new(&vfsd);
        cmd.arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--cache", cache, "--sandbox", "namespace"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if readonly {
            cmd.arg("--readonly");
        }
        let child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            what: vfsd.display().to_string(),
            source,
        })?;
        // From here on, dropping `d` kills the daemon.
        let mut d = Virtiofsd { child, socket, log };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !d.socket.exists() {
            if let Ok(Some(st)) = d.child.try_wait() {
                return Err(HarnessError::Timeout(format!(
                    "virtiofsd exited with {st} before listening: {}",
                    d.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout(format!(
                    "virtiofsd did not listen on {} within {LISTEN_TIMEOUT:?}: {}",
                    d.socket.display(),
                    d.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// Waits for the daemon to exit by itself (it does when its VMM goes away); kills it after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        wait_child(&mut self.child, timeout, "virtiofsd")
    }

    /// Where its log is written.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The husk-vmm arguments that attach it with `tag`.
    pub fn fs_arg(&self, tag: &str) -> Vec<String> {
        vec![
            "--fs".into(),
            format!("socket={},tag={tag}", self.socket.display()),
        ]
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
