//! The agent's control port (vsock 1025): a one-line protocol for the VMM, which has no gRPC client.
//! `shutdown\n` starts the same guest shutdown as the `Shutdown` RPC and is answered `ok\n`; anything
//! else is answered `error\n`. Used by husk-vmm's graceful stop (its control socket).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::shutdown::Shutdown;

pub const AGENT_CONTROL_PORT: u32 = 1025;
const MAX_LINE: u64 = 64;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlPortError {
    #[error("binding vsock port {AGENT_CONTROL_PORT}: {0}")]
    Bind(std::io::Error),
    #[error("accepting on vsock port {AGENT_CONTROL_PORT}: {0}")]
    Accept(std::io::Error),
}

/// Serves the control port until an accept error (the caller restarts it).
pub async fn serve(shutdown: Arc<Shutdown>) -> Result<(), ControlPortError> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_CONTROL_PORT))
        .map_err(ControlPortError::Bind)?;
    loop {
        let (stream, _) = listener.accept().await.map_err(ControlPortError::Accept)?;
        let shutdown = Arc::clone(&shutdown);
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(stream);
            let mut line = String::new();
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_LINE));
            let read = reader.read_line(&mut line);
            let answer: &[u8] = match tokio::time::timeout(READ_TIMEOUT, read).await {
                Ok(Ok(_)) if line.trim_end() == "shutdown" => match shutdown.trigger() {
                    Ok(_) => {
                        tracing::info!("shutdown requested on the control port");
                        b"ok\n"
                    }
                    Err(e) => {
                        tracing::error!("shutdown: {e}");
                        b"error\n"
                    }
                },
                _ => b"error\n",
            };
            let _ = w.write_all(answer).await;
        });
    }
}
