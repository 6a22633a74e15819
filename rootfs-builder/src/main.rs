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
    /// The guest's read-only root, a reproducible erofs image (Debian's mkfs.erofs) with the same files
    /// as the initrd: boot it with `husk-vmm --rootfs`. Needs root (it stages device nodes).
    Erofs {
        /// The program to run as /init: the statically linked husk-agent in production.
        #[arg(long, visible_alias = "agent")]
        init: PathBuf,
        /// An extra executable for the image: HOST_PATH:IMAGE_PATH (repeatable; test images only).
        #[arg(long = "add", value_parser = parse_add)]
        add: Vec<(PathBuf, String)>,
        /// Output file, e.g. build/guest/rootfs.erofs.
        #[arg(long)]
        out: PathBuf,
    },
    /// A busybox OCI image layout archive (uncompressed layer) for `ctr images import`, reproducible.
    OciImage {
        /// A static busybox: /bin/busybox, every applet (`busybox --list`) a hard link to it.
        #[arg(long)]
        busybox: PathBuf,
        /// Image name as containerd will list it.
        #[arg(long, default_value = "docker.io/library/busybox:latest")]
        name: String,
        /// Output file, e.g. build/images/busybox-oci.tar.
        #[arg(long)]
        out: PathBuf,
        /// The image's default command (config.Cmd), split on spaces.
        #[arg(long, default_value = "sh")]
        cmd: String,
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
        Cmd::Erofs { init, add, out } => {
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let size = husk_rootfs_builder::erofs::build_guest_erofs(&init, &add, &out)?;
            println!(
                "erofs root {} ({} KiB, /init from {})",
                out.display(),
                size / 1024,
                init.display()
            );
        }
        Cmd::OciImage {
            busybox,
            name,
            out,
            cmd,
        } => {
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let opts = husk_rootfs_builder::oci::ImageOptions {
                busybox,
                name: name.clone(),
                cmd: cmd.split_whitespace().map(String::from).collect(),
                applets: None,
            };
            let s = husk_rootfs_builder::oci::build_oci_image(&opts, &out)?;
            println!(
                "oci image {} ({} KiB, {name}, {} applets, manifest {})",
                out.display(),
                s.archive_bytes / 1024,
                s.applets,
                s.manifest_digest
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
