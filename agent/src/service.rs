//! The gRPC `husk.agent.v1.AgentService` implementation.

use std::sync::Arc;

use husk_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use husk_proto::v1::{
    GuestInfoRequest, GuestInfoResponse, PingRequest, PingResponse, ShutdownRequest,
    ShutdownResponse,
};
use husk_proto::{API_VERSION, MAX_MESSAGE_SIZE};
use tonic::{Request, Response, Status};

use crate::guest_info;
use crate::shutdown::Shutdown;

/// Version of this agent binary, reported by `Ping`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The service; cheap to share between connections.
#[derive(Debug, Clone)]
pub struct Agent {
    shutdown: Arc<Shutdown>,
}

impl Agent {
    /// A service that fires `shutdown` on the `Shutdown` RPC.
    pub fn new(shutdown: Arc<Shutdown>) -> Self {
        Self { shutdown }
    }

    /// Wraps the service in the generated tonic server with message caps.
    pub fn into_server(self) -> AgentServiceServer<Self> {
        AgentServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

#[tonic::async_trait]
impl AgentService for Agent {
    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        tracing::debug!("Ping");
        Ok(Response::new(PingResponse {
            agent_version: AGENT_VERSION.to_string(),
            api_version: API_VERSION,
        }))
    }

    async fn guest_info(
        &self,
        _: Request<GuestInfoRequest>,
    ) -> Result<Response<GuestInfoResponse>, Status> {
        tracing::debug!("GuestInfo");
        match tokio::task::spawn_blocking(guest_info::collect).await {
            Ok(Ok(info)) => Ok(Response::new(info)),
            Ok(Err(e)) => {
                tracing::warn!("GuestInfo: {e}");
                Err(Status::internal(e.to_string()))
            }
            Err(e) => Err(Status::internal(format!("GuestInfo task: {e}"))),
        }
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        match self.shutdown.trigger() {
            Ok(true) => tracing::info!("Shutdown requested"),
            Ok(false) => tracing::debug!("Shutdown requested again"),
            Err(e) => {
                tracing::error!("Shutdown: {e}");
                return Err(Status::internal(e.to_string()));
            }
        }
        Ok(Response::new(ShutdownResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::Reaper;
    use crate::shutdown::Mode;

    #[tokio::test]
    async fn ping_and_guest_info() {
        let agent = Agent::new(Shutdown::new(Mode::ExitProcess, Reaper::new()));
        let p = agent
            .ping(Request::new(PingRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.api_version, API_VERSION);
        assert_eq!(p.agent_version, AGENT_VERSION);
        let gi = agent
            .guest_info(Request::new(GuestInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(gi.kernel_release.len() <= 256 && !gi.kernel_release.is_empty());
        assert!(gi.online_cpus >= 1);
    }
}
