//! Test support (feature `test-util`): a stand-in for the VMM's hybrid vsock
//! Unix socket, so host-side code can be tested without a VM.
//!
//! [`HybridVsockProxy`] listens on a Unix socket, reads `CONNECT <port>\n`
//! and then, depending on its [`Behavior`], pipes the stream to a "guest"
//! Unix socket (like the VMM piping to the guest's vsock port), or misbehaves
//! in a chosen way.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::client::{read_reply_line, HANDSHAKE_MAX_LINE};

/// What the proxy does with each accepted connection.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Read the `CONNECT` line, connect to this Unix socket (the "guest"),
    /// reply `OK <hostport>\n` and pipe bytes both ways. If the guest socket
    /// does not accept, close the connection without a reply (a guest that
    /// does not listen yet).
    Pipe(PathBuf),
    /// Read the `CONNECT` line, write these bytes, keep the stream open.
    Reply(Vec<u8>),
    /// Read the `CONNECT` line, then close without replying.
    Close,
}

struct State {
    behavior: Mutex<Behavior>,
    handshakes: AtomicUsize,
    ports: Mutex<Vec<u32>>,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// A fake VMM hybrid vsock socket. Stops (and drops all its connections) when
/// dropped.
pub struct HybridVsockProxy {
    path: PathBuf,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl HybridVsockProxy {
    /// Binds `path` and starts serving with `behavior`.
    pub async fn start(path: &Path, behavior: Behavior) -> io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        let state = Arc::new(State {
            behavior: Mutex::new(behavior),
            handshakes: AtomicUsize::new(0),
            ports: Mutex::new(Vec::new()),
            conns: Mutex::new(Vec::new()),
        });
        let st = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let st2 = Arc::clone(&st);
                let task = tokio::spawn(handle(stream, st2));
                let mut conns = st.conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.retain(|t| !t.is_finished());
                conns.push(task);
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
            state,
            accept,
        })
    }

    /// The socket path clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the behavior for connections accepted from now on.
    pub fn set_behavior(&self, behavior: Behavior) {
        *self
            .state
            .behavior
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = behavior;
    }

    /// Number of complete `CONNECT` lines received so far.
    pub fn handshakes(&self) -> usize {
        self.state.handshakes.load(Ordering::SeqCst)
    }

    /// Ports requested by the `CONNECT` lines so far, in order.
    pub fn ports(&self) -> Vec<u32> {
        self.state
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Abruptly closes every open connection (like a guest or VMM going away).
    pub fn drop_connections(&self) {
        for t in self
            .state
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl Drop for HybridVsockProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn handle(mut host: UnixStream, st: Arc<State>) {
    let Ok(line) = read_reply_line(&mut host, HANDSHAKE_MAX_LINE).await else {
        return;
    };
    let port = line
        .strip_prefix(b"CONNECT ")
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse::<u32>().ok());
    let Some(port) = port else {
        return;
    };
    st.handshakes.fetch_add(1, Ordering::SeqCst);
    st.ports
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(port);
    let behavior = st
        .behavior
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match behavior {
        Behavior::Pipe(guest_path) => {
            let Ok(mut guest) = UnixStream::connect(&guest_path).await else {
                return;
            };
            if host.write_all(b"OK 1073741824\n").await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
        }
        Behavior::Reply(bytes) => {
            let _ = host.write_all(&bytes).await;
            std::future::pending::<()>().await;
        }
        Behavior::Close => {}
    }
}
