//! Small pieces the benchmark modules share: shell commands, helper daemons killed on drop, parsing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// Runs `cmd` with `sh -c`, failing with its output if it fails.
pub fn sh(cmd: &str) -> anyhow::Result<()> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A child process that is killed when dropped (a benchmark error must not leave daemons behind).
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
}

impl Daemon {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Daemon { child, name })
    }

    /// Waits for the daemon to exit by itself; kills it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<()> {
        husk_tests::wait_child(&mut self.child, timeout, self.name)?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A tap device with an address on the host side; deleted on drop.
pub struct Tap {
    pub name: &'static str,
}

impl Tap {
    pub fn create(name: &'static str, host_cidr: &str) -> anyhow::Result<Self> {
        let _ = sh(&format!("ip link del {name} 2>/dev/null"));
        sh(&format!(
            "ip tuntap add dev {name} mode tap && ip addr add {host_cidr} dev {name} && ip link set {name} up"
        ))?;
        Ok(Tap { name })
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = sh(&format!("ip link del {} 2>/dev/null", self.name));
    }
}

/// Writes `len` bytes of a cheap pseudo-random pattern (xorshift): real, allocated data, so neither
/// a sparse file nor a compressible one can flatter a read benchmark.
pub fn write_pattern(path: &Path, len: usize, seed: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut x = seed | 1;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}

/// Value of `key=` in a line of `key=value` words.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Median and range of a sample, for the table ("median (min–max)").
pub fn summary(v: &[f64], decimals: usize) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.*} ({:.*}–{:.*})",
        decimals,
        husk_tests::median(v),
        decimals,
        min,
        decimals,
        max
    )
}

/// Rounds to two decimals (ratios in results.json).
pub fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A fresh working directory on the test host's tmpfs, removed on drop.
pub fn workdir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix(prefix).tempdir()?)
}

/// `project_root()/rel`, which must exist.
pub fn built(rel: &str, hint: &str) -> anyhow::Result<PathBuf> {
    let p = husk_tests::project_root().join(rel);
    if !p.exists() {
        bail!("{} is missing: {hint}", p.display());
    }
    Ok(p)
}
