//! The control socket: how the shim manages a running VMM. A Unix stream socket; each request is one
//! JSON object on one line, each answer is one JSON object on one line. See docs/control-socket.md.

pub mod protocol;
pub mod server;
pub mod stats;

pub use protocol::{Request, StopMode};
pub use server::{spawn_control_server, ControlCommand};
pub use stats::{AttachedDevice, DeviceHandle};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot bind the control socket {path}: {source}")]
    Bind {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: std::path::PathBuf },
    #[error("request longer than {0} bytes")]
    TooLong(usize),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("starting the control thread: {0}")]
    Thread(std::io::Error),
}
