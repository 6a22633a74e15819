//! A client for containerd's CRI plugin (the kubelet's API) over its Unix socket, for end-to-end
//! tests that run pods the way Kubernetes does (`k8s-cri`'s generated v1 client on tonic).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Deadline of one CRI call: pod start boots a VM, which takes a while under nested emulation.
pub const CRI_CALL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("CRI client runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("connecting to the CRI socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A connected CRI client; calls are made with [`CriClient::block_on`] from synchronous tests.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

impl CriClient {
    /// Connects to containerd's gRPC socket (the CRI services share it).
    pub fn connect(socket: &Path) -> Result<CriClient, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async {
                // The URI is required by the API but unused: the connector dials the Unix socket.
                Endpoint::from_static("http://cri.invalid")
                    .timeout(CRI_CALL_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .map_err(|source| CriError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        Ok(CriClient { rt, channel })
    }

    /// The RuntimeService (pods, containers, exec, stats).
    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    /// The ImageService.
    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Runs one call to completion.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}
