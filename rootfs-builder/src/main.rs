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
    /// A guest initrd, reproducible cpio (newc): the static agent (or a test init) as /init.
    Initrd {
        /// The program to run as /init: the statically linked husk-agent in production.
        #[arg(long, visible_alias = "agent")]
        init: PathBuf,
        /// An extra executable for the image: HOST_PATH:IMAGE_PATH (repeatable; test images only).
        #[arg(long = "add", value_parser = parse_add)]
        add: Vec<(PathBuf, String)>,
        /// Output file, e.g. build/guest/initrd.img.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Initrd { init, add, out } => {
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let size = husk_rootfs_builder::initrd::build_guest_initrd(&init, &add, &out)?;
            println!(
                "initrd {} ({} KiB, /init from {})",
                out.display(),
                size / 1024,
                init.display()
            );
        }
    }
    Ok(())
}

fn parse_add(s: &str) -> Result<(PathBuf, String), String> {
    match s.split_once(':') {
        Some((host, image)) if !host.is_empty() && !image.trim_start_matches('/').is_empty() => {
            Ok((host.into(), image.to_string()))
        }
        _ => Err(format!("expected HOST_PATH:IMAGE_PATH, got {s:?}")),
    }
}
