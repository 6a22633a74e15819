//! `husk-rootfs-builder`: builds Husk's guest images offline.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "husk-rootfs-builder",
    about = "Builds Husk's guest images offline"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The guest initrd: the static agent as /init, reproducible cpio (newc).
    Initrd {
        /// The statically linked husk-agent binary.
        #[arg(long)]
        agent: PathBuf,
        /// Output file, e.g. build/guest/initrd.img.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Initrd { agent, out } => {
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let size = husk_rootfs_builder::initrd::build_guest_initrd(&agent, &out)?;
            println!(
                "initrd {} ({} KiB, agent {})",
                out.display(),
                size / 1024,
                agent.display()
            );
        }
    }
    Ok(())
}
