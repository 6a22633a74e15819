//! A virtiofsd (vhost-user-fs daemon, build/testhost/virtiofsd from `make testhost`) serving one
//! directory to a test VM; killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::project_root;

/// How long the daemon may take to create its socket (under nested emulation).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// The daemon binary, asserted to exist.
pub fn virtiofsd_binary() -> PathBuf {
    let vfsd = project_root().join("build/testhost/virtiofsd");
    assert!(
        vfsd.is_file(),
        "{} is missing: run 'make testhost' (it installs virtiofsd)",
        vfsd.display()
    );
    vfsd
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
    /// policy, read-only if asked; returns once the socket exists.
    pub fn start(dir: &Path, shared: &Path, name: &str, cache: &str, readonly: bool) -> Virtiofsd {
        let vfsd = virtiofsd_binary();
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(&vfsd);
        cmd.arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--cache", cache, "--sandbox", "namespace"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if readonly {
            cmd.arg("--readonly");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {vfsd:?}: {e}"));
        let mut d = Virtiofsd { child, socket, log };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !d.socket.exists() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("virtiofsd exited with {st} before listening: {}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "virtiofsd never listened: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
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
