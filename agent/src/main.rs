//! `husk-agent`: PID 1 of a Husk microVM. Sets up the guest, reaps orphans
//! and serves the agent API (`husk.agent.v1.AgentService`) on vsock.
//!
//! Not PID 1 (host-side testing): skips the guest setup, and can serve on a
//! Unix socket with `--listen-unix PATH`; `Shutdown` then exits the process.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use husk_agent::cli::{self, Command, USAGE};
use husk_agent::container::{Engine, EngineConfig};
use husk_agent::reaper::Reaper;
use husk_agent::server::{self, Listen};
use husk_agent::shutdown::{Mode, Shutdown};
use husk_agent::{init, logging, service};

fn main() {
    let pid1 = std::process::id() == 1;
    std::panic::set_hook(Box::new(|info| {
        // Straight to stderr: works before and after logging is set up.
        eprintln!("husk-agent: PANIC: {info}");
    }));

    let default = Listen::Vsock(husk_proto::AGENT_VSOCK_PORT);
    let listen = match cli::parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run(listen)) => listen,
        // PID 1 must never exit, whatever the kernel passes as arguments.
        Ok(_) if pid1 => default,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return;
        }
        Ok(Command::Version) => {
            println!("husk-agent {}", service::AGENT_VERSION);
            return;
        }
        Err(e) if pid1 => {
            eprintln!("husk-agent: {e}; using defaults");
            default
        }
        Err(e) => {
            eprintln!("husk-agent: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };

    let early = if pid1 {
        init::early()
    } else {
        init::EarlyReport::default()
    };
    let (level, bad_level) = cli::log_level(pid1);
    logging::init(level);
    tracing::info!(
        "husk-agent {} (api {}){}",
        service::AGENT_VERSION,
        husk_proto::API_VERSION,
        if pid1 { " as PID 1" } else { "" }
    );
    if let Some(bad) = bad_level {
        tracing::warn!("unknown log level {bad:?}, using {level}");
    }
    tracing::debug!("early mounts: {}", early.mounted.join(" "));
    for e in &early.errors {
        tracing::warn!("{e}");
    }
    if pid1 {
        init::setup();
    }

    let reaper = Reaper::new();
    let mode = if pid1 {
        Mode::PowerOff
    } else {
        Mode::ExitProcess
    };
    let shutdown = Shutdown::new(mode, Arc::clone(&reaper));
    loop {
        // `run` never returns; this loop only turns a panic escaping the
        // runtime (or a runtime that cannot be built) into a restart, since
        // PID 1 exiting panics the kernel.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(16)
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run(
                    listen.clone(),
                    Arc::clone(&reaper),
                    Arc::clone(&shutdown),
                )),
                Err(e) => tracing::error!("tokio runtime: {e}"),
            }
        }));
        if result.is_err() {
            tracing::error!("runtime panicked");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Reaper and server, each restarted whenever it stops. Never returns.
async fn run(listen: Listen, reaper: Arc<Reaper>, shutdown: Arc<Shutdown>) -> ! {
    let r = Arc::clone(&reaper);
    tokio::spawn(server::supervise("reaper", move || Arc::clone(&r).run()));
    let engine = Engine::new(EngineConfig::default(), Arc::clone(&reaper));
    if matches!(listen, Listen::Vsock(_)) {
        let s = Arc::clone(&shutdown);
        tokio::spawn(server::supervise("control port", move || {
            husk_agent::control_port::serve(Arc::clone(&s))
        }));
    }
    let agent = service::Agent::new(shutdown, engine);
    server::supervise("server", move || {
        let listen = listen.clone();
        let agent = agent.clone();
        async move { server::serve(&listen, agent).await }
    })
    .await
}
