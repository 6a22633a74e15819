//! The long-running shim process: serves the Task API on containerd's TTRPC socket until Shutdown.

use std::path::Path;
use std::sync::Arc;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::shim_async::{create_task, Task};
use containerd_shim::protos::ttrpc::asynchronous::Server;
use tokio::sync::Notify;

use crate::bootstrap::{socket_path, ShimArgs};
use crate::config::ShimConfig;
use crate::task::events::Events;
use crate::task::TaskService;

/// Service names of the Task API: containerd 1.6/1.7 call v2, containerd 2.x v3; the messages are the same.
pub const TASK_SERVICE_V3: &str = "containerd.task.v3.Task";
pub const TASK_SERVICE_V2: &str = "containerd.task.v2.Task";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("TTRPC_ADDRESS is not set: the shim must be started by containerd")]
    NoTtrpcAddress,
    #[error("connecting to containerd's event service at {address}: {message}")]
    Publisher { address: String, message: String },
    #[error("serving {address}: {message}")]
    Serve { address: String, message: String },
}

/// Runs the shim server for pod `args.id` on `socket` (a `unix://` address), in the bundle directory.
pub async fn serve(args: &ShimArgs, socket: &str, bundle: &Path) -> Result<(), ServerError> {
    let r = serve_inner(args, socket, bundle).await;
    if let Err(e) = &r {
        // `start` sees only that we died; containerd's log (our log FIFO) gets the reason.
        tracing::error!(error = %e, "the shim server failed");
    }
    r
}

async fn serve_inner(args: &ShimArgs, socket: &str, bundle: &Path) -> Result<(), ServerError> {
    let config = ShimConfig::load_from_env();
    let filter = match (&config, args.debug) {
        (_, true) => "debug".to_string(),
        (Ok(c), false) => c.log_level.clone(),
        (Err(_), false) => "info".to_string(),
    };
    crate::logging::init(bundle, &filter);
    let config = match config {
        Ok(c) => Ok(c),
        Err(e) => {
            tracing::error!(error = %e, "bad Husk configuration: every container of this pod will fail to start");
            Err(e.to_string())
        }
    };
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").map_err(|_| ServerError::NoTtrpcAddress)?;
    let publisher =
        RemotePublisher::new(&ttrpc_address)
            .await
            .map_err(|e| ServerError::Publisher {
                address: ttrpc_address.clone(),
                message: e.to_string(),
            })?;
    let exit = Arc::new(Notify::new());
    let task: Arc<dyn Task + Send + Sync> = Arc::new(TaskService::new(
        Events::new(publisher, args.namespace.clone()),
        config,
        args.id.clone(),
        exit.clone(),
    ));
    let mut services = create_task(task.clone());
    if let Some(v3) = create_task(task).remove(TASK_SERVICE_V3) {
        services.insert(TASK_SERVICE_V2.to_string(), v3);
    }
    let serve_err = |e: containerd_shim::protos::ttrpc::Error| ServerError::Serve {
        address: socket.to_string(),
        message: e.to_string(),
    };
    let mut server = Server::new()
        .bind(socket)
        .map_err(serve_err)?
        .register_service(services);
    server.start().await.map_err(serve_err)?;
    tracing::info!(pod = %args.id, socket, "shim serving");
    // Tell `start` we are listening: it reads our stdout until EOF.
    let _ = nix::unistd::dup2_stdout(std::io::stderr());

    exit.notified().await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(socket_path(socket));
    tracing::info!(pod = %args.id, "shim exiting");
    Ok(())
}
