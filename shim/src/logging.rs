//! The shim's logs go where containerd expects them: the `log` FIFO in the bundle directory, which
//! containerd copies into its own log. Writes never block the shim: a full FIFO drops lines.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use tracing_subscriber::EnvFilter;

/// Installs the tracing subscriber. `filter` is a tracing filter (`info`, `husk_shim=debug`...). Falls back
/// to stderr when there is no `log` FIFO (the shim was started by hand).
pub fn init(bundle: &Path, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(bundle.join("log"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    match fifo {
        Ok(f) => {
            let f = std::sync::Arc::new(f);
            builder
                .with_writer(move || -> Box<dyn std::io::Write> { Box::new(FileRef(f.clone())) })
                .init()
        }
        Err(_) => builder.with_writer(std::io::stderr).init(),
    }
}

struct FileRef(std::sync::Arc<File>);

impl std::io::Write for FileRef {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
