//! Serving the agent API: listeners (vsock in the guest, Unix socket for
//! host-side testing) and the supervisor that keeps the server alive forever.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::time::Sleep;
use tokio_stream::Stream;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::service::Agent;

/// Concurrent gRPC streams one client connection may hold open.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Where to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// vsock `VMADDR_CID_ANY:port` (the guest).
    Vsock(u32),
    /// A Unix socket path (host-side testing).
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Vsock(port) => write!(f, "vsock port {port}"),
            Listen::Unix(path) => write!(f, "unix {}", path.display()),
        }
    }
}

/// Server errors.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the listener failed.
    #[error("binding {listen}: {source}")]
    Bind {
        /// The address.
        listen: Listen,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// tonic's server failed.
    #[error("serving on {listen}: {source}")]
    Serve {
        /// The address.
        listen: Listen,
        /// The error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server returned although it should run forever.
    #[error("server on {0} stopped unexpectedly")]
    Stopped(Listen),
}

/// Binds `listen` and serves `agent` until an error.
pub async fn serve(listen: &Listen, agent: Agent) -> Result<(), ServerError> {
    let bind_err = |source| ServerError::Bind {
        listen: listen.clone(),
        source,
    };
    // Every open stream (a WaitProcess, an OomEvents subscription, a stdout reader) is a task
    // and a channel here: cap them per connection so a runaway client gets REFUSED_STREAM
    // instead of growing the agent without bound. A pod's shim needs a few per process.
    let server =
        tonic::transport::Server::builder().max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let result = match listen {
        Listen::Vsock(port) => {
            let l = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, *port)).map_err(bind_err)?;
            tracing::info!("listening on {listen}");
            server
                .serve_with_incoming(agent.into_server(), Incoming::new(l))
                .await
        }
        Listen::Unix(path) => {
            remove_stale_socket(path);
            let l = UnixListener::bind(path).map_err(bind_err)?;
            tracing::info!("listening on {listen}");
            server
                .serve_with_incoming(agent.into_server(), Incoming::new(l))
                .await
        }
    };
    match result {
        Ok(()) => Err(ServerError::Stopped(listen.clone())),
        Err(source) => Err(ServerError::Serve {
            listen: listen.clone(),
            source,
        }),
    }
}

/// Removes `path` if it is a socket left behind by an earlier run.
fn remove_stale_socket(path: &Path) {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs the future made by `make` forever: whenever it ends (error, or a
/// panic caught by the task), logs and restarts it after a backoff.
pub async fn supervise<F, Fut, E>(name: &'static str, mut make: F) -> !
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);
    let mut backoff = MIN;
    loop {
        let started = tokio::time::Instant::now();
        match tokio::spawn(make()).await {
            Ok(Ok(())) => tracing::warn!("{name} stopped; restarting"),
            Ok(Err(e)) => tracing::error!("{name}: {e}; restarting"),
            Err(e) => tracing::error!("{name} task died: {e}; restarting"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX);
    }
}

/// Something that accepts connections.
trait Accept {
    type Io;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>>;
}

impl Accept for VsockListener {
    type Io = tokio_vsock::VsockStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
        VsockListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
        UnixListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

/// Accepted connections as a stream for tonic. Accept errors (EMFILE,
/// ECONNABORTED, ...) are logged and followed by a short pause instead of
/// being handed to tonic, which would retry at once and spin.
struct Incoming<L> {
    listener: L,
    pause: Option<Pin<Box<Sleep>>>,
}

impl<L> Incoming<L> {
    fn new(listener: L) -> Self {
        Self {
            listener,
            pause: None,
        }
    }
}

impl<L: Accept + Unpin> Stream for Incoming<L> {
    type Item = io::Result<L::Io>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = this.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok(io)) => return Poll::Ready(Some(Ok(io))),
                Poll::Ready(Err(e)) => {
                    tracing::warn!("accept: {e}");
                    this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
