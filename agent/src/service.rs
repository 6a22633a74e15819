//! The gRPC `husk.agent.v1.AgentService` implementation.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use husk_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use husk_proto::v1::*;
use husk_proto::{API_VERSION, MAX_MESSAGE_SIZE, MAX_STDIN_CHUNK, MAX_STDIO_CHUNK};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::container::{self, CreateParams, Engine, EngineError, ExecParams};
use crate::guest_info;
use crate::network::Network;
use crate::shutdown::Shutdown;
use crate::storage::Storage;

/// Chunks buffered between a process's pipe and its gRPC output stream.
const STDIO_DEPTH: usize = 4;
/// Most pids returned by ListProcesses.
const MAX_LIST_PIDS: usize = 65536;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Runs blocking engine work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("engine task: {e}"))),
    }
}

/// The status of a failed stdin write, naming the process.
fn stdin_status(container_id: &str, exec_id: &str, e: container::stdio::StdinError) -> Status {
    use container::stdio::StdinError;
    let msg = format!("container {container_id:?} exec {exec_id:?}: {e}");
    match e {
        StdinError::Closed => Status::failed_precondition(msg),
        StdinError::Aborted { .. } => Status::aborted(msg),
        StdinError::Io { .. } => Status::failed_precondition(msg),
    }
}

/// Version of this agent binary, reported by `Ping`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The service; cheap to share between connections.
#[derive(Debug, Clone)]
pub struct Agent {
    shutdown: Arc<Shutdown>,
    engine: Arc<Engine>,
    storage: Arc<Storage>,
    network: Arc<Network>,
}

impl Agent {
    /// A service that fires `shutdown` on the `Shutdown` RPC and runs
    /// containers with `engine`.
    pub fn new(shutdown: Arc<Shutdown>, engine: Arc<Engine>) -> Self {
        Self::with_storage(shutdown, engine, Arc::new(Storage::default()))
    }

    /// As [`Agent::new`], with a given storage table (tests).
    pub fn with_storage(
        shutdown: Arc<Shutdown>,
        engine: Arc<Engine>,
        storage: Arc<Storage>,
    ) -> Self {
        Self {
            shutdown,
            engine,
            storage,
            network: Arc::new(Network::default()),
        }
    }

    fn output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>, Status> {
        let p = self.engine.process(id, exec_id)?;
        let out = if stderr {
            &p.stdio.stderr
        } else {
            &p.stdio.stdout
        };
        Ok(container::stdio::read_stream(
            out,
            MAX_STDIO_CHUNK,
            STDIO_DEPTH,
        )?)
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

    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let r = req.into_inner();
        let engine = Arc::clone(&self.engine);
        let params = CreateParams {
            id: r.container_id.clone(),
            spec_json: r.oci_spec_json,
            rootfs: PathBuf::from(r.rootfs_path),
            stdin: r.stdin,
            terminal: r.terminal,
        };
        let pid = blocking(move || engine.create(params)).await?;
        Ok(Response::new(CreateContainerResponse {
            container_id: r.container_id,
            pid: pid as u32,
        }))
    }

    async fn start_container(
        &self,
        req: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        let r = req.into_inner();
        let engine = Arc::clone(&self.engine);
        let id = r.container_id.clone();
        blocking(move || engine.start(&id)).await?;
        Ok(Response::new(StartContainerResponse {
            container_id: r.container_id,
        }))
    }

    async fn exec_process(
        &self,
        req: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        let r = req.into_inner();
        let engine = Arc::clone(&self.engine);
        let params = ExecParams {
            id: r.container_id.clone(),
            exec_id: r.exec_id.clone(),
            process_json: r.process_json,
            stdin: r.stdin,
            terminal: r.terminal,
        };
        let pid = blocking(move || engine.exec(params)).await?;
        Ok(Response::new(ExecProcessResponse {
            container_id: r.container_id,
            exec_id: r.exec_id,
            pid: pid as u32,
        }))
    }

    async fn signal_process(
        &self,
        req: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        let r = req.into_inner();
        self.engine
            .signal(&r.container_id, &r.exec_id, r.signal, r.all)?;
        Ok(Response::new(SignalProcessResponse {}))
    }

    async fn wait_process(
        &self,
        req: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let r = req.into_inner();
        let exit = self.engine.wait(&r.container_id, &r.exec_id).await?;
        Ok(Response::new(WaitProcessResponse {
            container_id: r.container_id,
            exec_id: r.exec_id,
            exit_status: exit.status,
            exited_at_unix_nanos: exit.at_unix_nanos,
            oom_killed: exit.oom_killed,
        }))
    }

    async fn remove_container(
        &self,
        req: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        let r = req.into_inner();
        self.engine.remove(&r.container_id, r.force).await?;
        Ok(Response::new(RemoveContainerResponse {}))
    }

    async fn list_processes(
        &self,
        req: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        let r = req.into_inner();
        let engine = Arc::clone(&self.engine);
        let id = r.container_id.clone();
        let (procs, pids) = blocking(move || engine.list(&id, MAX_LIST_PIDS)).await?;
        Ok(Response::new(ListProcessesResponse {
            container_id: r.container_id,
            processes: procs
                .into_iter()
                .map(|p| ListedProcess {
                    exec_id: p.exec_id,
                    pid: p.pid as u32,
                    exited: p.exit.is_some(),
                    exit_status: p.exit.map_or(0, |e| e.status),
                })
                .collect(),
            pids: pids.into_iter().map(|p| p as u32).collect(),
        }))
    }

    type ReadStdoutStream = BoxStream<ReadStdoutResponse>;

    async fn read_stdout(
        &self,
        req: Request<ReadStdoutRequest>,
    ) -> Result<Response<Self::ReadStdoutStream>, Status> {
        let r = req.into_inner();
        let rx = self.output(&r.container_id, &r.exec_id, false)?;
        let s = ReceiverStream::new(rx).map(|c| {
            c.map(|data| ReadStdoutResponse { data })
                .map_err(|e| Status::internal(format!("reading stdout: {e}")))
        });
        Ok(Response::new(Box::pin(s)))
    }

    type ReadStderrStream = BoxStream<ReadStderrResponse>;

    async fn read_stderr(
        &self,
        req: Request<ReadStderrRequest>,
    ) -> Result<Response<Self::ReadStderrStream>, Status> {
        let r = req.into_inner();
        let rx = self.output(&r.container_id, &r.exec_id, true)?;
        let s = ReceiverStream::new(rx).map(|c| {
            c.map(|data| ReadStderrResponse { data })
                .map_err(|e| Status::internal(format!("reading stderr: {e}")))
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn write_stdin(
        &self,
        req: Request<WriteStdinRequest>,
    ) -> Result<Response<WriteStdinResponse>, Status> {
        let r = req.into_inner();
        if r.data.len() > MAX_STDIN_CHUNK {
            return Err(Status::invalid_argument(format!(
                "data: {} bytes, limit {MAX_STDIN_CHUNK}",
                r.data.len()
            )));
        }
        let p = self.engine.process(&r.container_id, &r.exec_id)?;
        // Awaits room in the pipe on the reactor: a process that never reads
        // holds this call (the client's backpressure), not a thread.
        let n = p
            .stdio
            .stdin
            .write(&r.data)
            .await
            .map_err(|e| stdin_status(&r.container_id, &r.exec_id, e))?;
        Ok(Response::new(WriteStdinResponse { written: n as u32 }))
    }

    async fn close_stdin(
        &self,
        req: Request<CloseStdinRequest>,
    ) -> Result<Response<CloseStdinResponse>, Status> {
        let r = req.into_inner();
        let p = self.engine.process(&r.container_id, &r.exec_id)?;
        // Aborts pending writes and closes the agent's end (VEOF for a terminal).
        p.stdio.stdin.close().await;
        Ok(Response::new(CloseStdinResponse {}))
    }

    async fn resize_pty(
        &self,
        req: Request<ResizePtyRequest>,
    ) -> Result<Response<ResizePtyResponse>, Status> {
        let r = req.into_inner();
        let (Ok(rows), Ok(cols)) = (u16::try_from(r.rows), u16::try_from(r.cols)) else {
            return Err(Status::invalid_argument("rows/cols: must be 1..=65535"));
        };
        if rows == 0 || cols == 0 {
            return Err(Status::invalid_argument("rows/cols: must be 1..=65535"));
        }
        let p = self.engine.process(&r.container_id, &r.exec_id)?;
        let pty = p
            .stdio
            .pty
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("the process has no terminal"))?;
        container::stdio::resize(pty, rows, cols)
            .map_err(|e| Status::internal(format!("TIOCSWINSZ: {e}")))?;
        Ok(Response::new(ResizePtyResponse {}))
    }

    async fn pause_container(
        &self,
        req: Request<PauseContainerRequest>,
    ) -> Result<Response<PauseContainerResponse>, Status> {
        let id = req.into_inner().container_id;
        let engine = Arc::clone(&self.engine);
        blocking(move || engine.set_paused(&id, true)).await?;
        Ok(Response::new(PauseContainerResponse {}))
    }

    async fn resume_container(
        &self,
        req: Request<ResumeContainerRequest>,
    ) -> Result<Response<ResumeContainerResponse>, Status> {
        let id = req.into_inner().container_id;
        let engine = Arc::clone(&self.engine);
        blocking(move || engine.set_paused(&id, false)).await?;
        Ok(Response::new(ResumeContainerResponse {}))
    }

    async fn stats_container(
        &self,
        req: Request<StatsContainerRequest>,
    ) -> Result<Response<StatsContainerResponse>, Status> {
        let id = req.into_inner().container_id;
        let engine = Arc::clone(&self.engine);
        let id2 = id.clone();
        let s = blocking(move || engine.stats(&id2)).await?;
        // The pod's interfaces (the guest's network namespace). Their absence
        // must not hide the cgroup figures.
        let network = self.network.interface_stats().await.unwrap_or_else(|e| {
            tracing::warn!("StatsContainer: interface counters: {e}");
            Vec::new()
        });
        Ok(Response::new(StatsContainerResponse {
            container_id: id,
            cpu: Some(ContainerCpuStats {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                nr_periods: s.cpu_nr_periods,
                nr_throttled: s.cpu_nr_throttled,
                throttled_usec: s.cpu_throttled_usec,
            }),
            memory: Some(ContainerMemoryStats {
                usage_bytes: s.memory_usage,
                limit_bytes: s.memory_limit,
                swap_usage_bytes: s.swap_usage,
                oom_kills: s.oom_kills,
                stat: s.memory_stat.into_iter().collect(),
            }),
            pids: Some(ContainerPidsStats {
                current: s.pids_current,
                limit: s.pids_limit,
            }),
            io: s
                .io
                .into_iter()
                .map(
                    |(major, minor, rbytes, wbytes, rios, wios)| ContainerIoStats {
                        major,
                        minor,
                        rbytes,
                        wbytes,
                        rios,
                        wios,
                    },
                )
                .collect(),
            network,
        }))
    }

    async fn update_container(
        &self,
        req: Request<UpdateContainerRequest>,
    ) -> Result<Response<UpdateContainerResponse>, Status> {
        let r = req.into_inner();
        let engine = Arc::clone(&self.engine);
        blocking(move || engine.update(&r.container_id, &r.resources_json)).await?;
        Ok(Response::new(UpdateContainerResponse {}))
    }

    async fn mount_storage(
        &self,
        req: Request<MountStorageRequest>,
    ) -> Result<Response<MountStorageResponse>, Status> {
        let r = req.into_inner();
        let storage = Arc::clone(&self.storage);
        blocking(move || storage.mount(&r.fstype, &r.source, &r.target, &r.options, r.readonly))
            .await?;
        Ok(Response::new(MountStorageResponse {}))
    }

    async fn unmount_storage(
        &self,
        req: Request<UnmountStorageRequest>,
    ) -> Result<Response<UnmountStorageResponse>, Status> {
        let r = req.into_inner();
        let storage = Arc::clone(&self.storage);
        blocking(move || storage.unmount(&r.target)).await?;
        Ok(Response::new(UnmountStorageResponse {}))
    }

    async fn setup_network(
        &self,
        req: Request<SetupNetworkRequest>,
    ) -> Result<Response<SetupNetworkResponse>, Status> {
        let r = req.into_inner();
        self.network.setup(&r).await.map_err(|e| {
            tracing::warn!("SetupNetwork: {e}");
            Status::from(e)
        })?;
        Ok(Response::new(SetupNetworkResponse {}))
    }

    type OomEventsStream = BoxStream<OomEventsResponse>;

    async fn oom_events(
        &self,
        _: Request<OomEventsRequest>,
    ) -> Result<Response<Self::OomEventsStream>, Status> {
        let mut events = self.engine.oom_events();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = tx.closed() => return,
                };
                match ev {
                    Ok(container_id) => {
                        if tx
                            .send(Ok(OomEventsResponse { container_id }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("OomEvents reader lagged, {n} events dropped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::Reaper;
    use crate::shutdown::Mode;

    #[tokio::test]
    async fn ping_and_guest_info() {
        let reaper = Reaper::new();
        let engine = Engine::new(container::EngineConfig::default(), Arc::clone(&reaper));
        let agent = Agent::new(Shutdown::new(Mode::ExitProcess, reaper), engine);
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

    #[tokio::test]
    async fn storage_and_update_refuse_bad_requests() {
        let reaper = Reaper::new();
        let engine = Engine::new(container::EngineConfig::default(), Arc::clone(&reaper));
        let agent = Agent::new(Shutdown::new(Mode::ExitProcess, reaper), engine);
        let mount = |fstype: &str, target: &str, options: &[&str]| MountStorageRequest {
            fstype: fstype.into(),
            source: "share".into(),
            target: target.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            readonly: false,
        };
        let e = agent
            .mount_storage(Request::new(mount(
                "virtiofs",
                "/run/husk/s",
                &["nodev", "bogus"],
            )))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("options[1]") && e.message().contains("bogus"),
            "{e}"
        );
        let e = agent
            .mount_storage(Request::new(mount("virtiofs", "/run/husk/../etc", &[])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("target:"), "{e}");
        let e = agent
            .mount_storage(Request::new(mount("nfs", "/run/husk/s", &[])))
            .await
            .unwrap_err();
        assert!(e.message().starts_with("fstype:"), "{e}");
        let e = agent
            .unmount_storage(Request::new(UnmountStorageRequest {
                target: "/run/husk/never".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = agent
            .unmount_storage(Request::new(UnmountStorageRequest { target: "/".into() }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let update = |id: &str, json: &[u8]| UpdateContainerRequest {
            container_id: id.into(),
            resources_json: json.to_vec(),
        };
        let e = agent
            .update_container(Request::new(update("c1", b"{not json")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("resources_json:"), "{e}");
        let e = agent
            .update_container(Request::new(update(
                "c1",
                br#"{"memory":{"limit":1000,"swap":10}}"#,
            )))
            .await
            .unwrap_err();
        assert!(
            e.message().starts_with("resources_json.memory.swap:"),
            "{e}"
        );
        let e = agent
            .update_container(Request::new(update("c1", br#"{"pids":{"limit":5}}"#)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = agent
            .update_container(Request::new(update("../x", b"{}")))
            .await
            .unwrap_err();
        assert!(e.message().starts_with("container_id:"), "{e}");
    }

    #[tokio::test]
    async fn setup_network_refuses_bad_requests_before_touching_anything() {
        let reaper = Reaper::new();
        let engine = Engine::new(container::EngineConfig::default(), Arc::clone(&reaper));
        let agent = Agent::new(Shutdown::new(Mode::ExitProcess, reaper), engine);
        let iface = |addr: &str| NetworkInterface {
            mac: "02:11:22:33:44:55".into(),
            addresses: vec![addr.into()],
            up: true,
            ..Default::default()
        };
        let req = |interfaces, routes| SetupNetworkRequest {
            interfaces,
            routes,
            ..Default::default()
        };
        let e = agent
            .setup_network(Request::new(req(vec![iface("10.0.0.2/40")], vec![])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().starts_with("interfaces[0].addresses[0]:"),
            "{e}"
        );
        let route = NetworkRoute {
            destination: "10.1.0.0/16".into(),
            gateway: "fd00::1".into(),
            ..Default::default()
        };
        let e = agent
            .setup_network(Request::new(req(vec![], vec![route])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("routes[0].gateway:"), "{e}");
        let e = agent
            .setup_network(Request::new(req(vec![iface("10.0.0.2/24"); 17], vec![])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("interfaces: 17 entries"), "{e}");
    }
}
