//! `containerd-shim-husk-v2`: see the husk_shim crate documentation.

use std::path::PathBuf;

use anyhow::Context;
use husk_shim::bootstrap::{self, ShimArgs};

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let flags = containerd_shim::parse(&argv).context("parsing the shim's arguments")?;
    if flags.version {
        println!("containerd-shim-husk-v2 {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let args = ShimArgs {
        namespace: flags.namespace.clone(),
        id: flags.id.clone(),
        address: flags.address.clone(),
        debug: flags.debug,
    };
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().context("reading the working directory (the bundle)")?
    } else {
        PathBuf::from(&flags.bundle)
    };
    match flags.action.as_str() {
        "start" => {
            let address = bootstrap::start(&args, &bundle)?;
            print!("{address}");
            Ok(())
        }
        "delete" => {
            // containerd logs this command's stderr as warnings: only real problems go there.
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            let reply = bootstrap::delete(&args, &bundle);
            use std::io::Write;
            std::io::stdout().write_all(&reply)?;
            Ok(())
        }
        "" if !flags.socket.is_empty() => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let served = rt.block_on(husk_shim::server::serve(&args, &flags.socket, &bundle));
            // A stdio copier may still block in open(2)/read(2) on a FIFO nobody will touch again: do not
            // wait for those threads on the way out.
            rt.shutdown_background();
            served?;
            Ok(())
        }
        other => anyhow::bail!(
            "unknown action {other:?} (containerd runs this binary with start, delete, or -socket)"
        ),
    }
}
