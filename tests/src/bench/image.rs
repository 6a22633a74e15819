//! Guest image choice (docs/guest-image.md): the production image (the agent as /init) booted as an
//! initrd, and the same files as a read-only erofs or ext4 root on virtio-blk. Measures boot → agent
//! answering `Ping`, the VMM's RSS and the guest's MemAvailable with the agent idle.
//!
//! The disk images are built here, in the test host, from the initrd itself (`cpio -i`, then
//! `mkfs.erofs` / `mkfs.ext4 -d`), so all three variants carry exactly the same files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use husk_proto::client::{AgentClient, ClientOptions};
use husk_proto::AGENT_VSOCK_PORT;
use husk_tests::{median, wait_child, Artifacts};

use super::util::{r2, sh, summary, workdir};

const GUEST_MIB: u64 = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Initrd,
    Erofs,
    Ext4,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Initrd, Variant::Erofs, Variant::Ext4];

    fn name(self) -> &'static str {
        match self {
            Variant::Initrd => "initrd",
            Variant::Erofs => "erofs",
            Variant::Ext4 => "ext4",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    boot_ms: f64,
    rss_kib: f64,
    avail_kib: f64,
}

pub struct ImageResults {
    samples: Vec<(Variant, Vec<Sample>)>,
    sizes: Vec<(Variant, u64)>,
}

struct Images {
    dir: tempfile::TempDir,
    erofs: PathBuf,
    ext4: PathBuf,
}

fn build_images(a: &Artifacts) -> anyhow::Result<Images> {
    let dir = workdir("husk-bench-img-")?;
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree)?;
    // busybox's cpio (busybox-static is in the test host); as root it recreates the device nodes.
    let st = Command::new("busybox")
        .args(["cpio", "-i", "-d", "-m"])
        .current_dir(&tree)
        .stdin(std::fs::File::open(&a.initrd)?)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("busybox cpio")?;
    if !st.success() {
        bail!("unpacking {} failed: {st}", a.initrd.display());
    }
    let erofs = dir.path().join("root.erofs");
    let ext4 = dir.path().join("root.ext4");
    sh(&format!(
        "mkfs.erofs --quiet --all-root -T0 {} {}",
        erofs.display(),
        tree.display()
    ))?;
    // ext4 without a journal (the root is read-only), sized with room for the metadata.
    let initrd_mib = std::fs::metadata(&a.initrd)?.len() >> 20;
    sh(&format!(
        "mkfs.ext4 -q -F -O ^has_journal -E root_owner=0:0 -d {} {} {}M",
        tree.display(),
        ext4.display(),
        initrd_mib * 2 + 8
    ))?;
    Ok(Images { dir, erofs, ext4 })
}

impl Images {
    fn disk(&self, v: Variant) -> Option<(&Path, &'static str)> {
        match v {
            Variant::Initrd => None,
            Variant::Erofs => Some((&self.erofs, "erofs")),
            Variant::Ext4 => Some((&self.ext4, "ext4")),
        }
    }
}

/// One boot: husk-vmm started by hand, so that each variant gets exactly its own image arguments (the
/// bench builds its own erofs/ext4 images from the initrd, not the harness's default root image).
fn boot(
    a: &Artifacts,
    images: &Images,
    v: Variant,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Sample> {
    let vm_dir = tempfile::Builder::new()
        .prefix("husk-vm-")
        .tempdir_in(images.dir.path())?;
    let sock = vm_dir.path().join("vsock.sock");
    let console = vm_dir.path().join("console.log");
    let mut cmd = Command::new(&a.vmm);
    cmd.arg("--kernel")
        .arg(&a.kernel)
        .args(["--vcpus", "1", "--mem-mib", &GUEST_MIB.to_string()])
        .arg("--vsock-uds")
        .arg(&sock)
        .arg("--console")
        .arg(&console);
    match images.disk(v) {
        None => {
            cmd.arg("--initrd").arg(&a.initrd);
        }
        Some((img, fstype)) => {
            // The kernel mounts the root itself; the agent is /init there as in the initrd.
            cmd.arg("--disk")
                .arg(format!("path={},ro", img.display()))
                .arg("--cmdline")
                .arg(format!("root=/dev/vda ro rootfstype={fstype} init=/init"));
        }
    }
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting husk-vmm")?;
    let result = (|| -> anyhow::Result<Sample> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !sock.exists() {
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                bail!("the VMM never created its vsock socket");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let opts = ClientOptions {
            retry_initial_backoff: Duration::from_millis(5),
            retry_max_backoff: Duration::from_millis(50),
            ..Default::default()
        };
        let client = rt.block_on(AgentClient::connect_with_retry(
            &sock,
            AGENT_VSOCK_PORT,
            opts,
            deadline,
        ))?;
        let boot_ms = started.elapsed().as_secs_f64() * 1000.0;
        let info = rt.block_on(client.guest_info())?;
        let rss_kib = husk_tests::rss_kib(child.id()).context("VMM RSS")? as f64;
        rt.block_on(client.shutdown())?;
        drop(client);
        let st = wait_child(&mut child, Duration::from_secs(60), "husk-vmm")?;
        if !st.success() {
            bail!("husk-vmm exited with {st}");
        }
        Ok(Sample {
            boot_ms,
            rss_kib,
            avail_kib: (info.mem_available_bytes / 1024) as f64,
        })
    })();
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        let con = std::fs::read_to_string(&console).unwrap_or_default();
        return result.with_context(|| {
            format!(
                "{} boot; stderr: {err}\nconsole tail:\n{}",
                v.name(),
                con.lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    }
    result
}

pub fn run(
    a: &Artifacts,
    runs: usize,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<ImageResults> {
    let images = build_images(a)?;
    let sizes = vec![
        (Variant::Initrd, std::fs::metadata(&a.initrd)?.len()),
        (Variant::Erofs, std::fs::metadata(&images.erofs)?.len()),
        (Variant::Ext4, std::fs::metadata(&images.ext4)?.len()),
    ];
    // One warm-up boot each: the first read of an image must not count against it.
    for v in Variant::ALL {
        boot(a, &images, v, rt)?;
    }
    let mut samples: Vec<(Variant, Vec<Sample>)> =
        Variant::ALL.iter().map(|v| (*v, Vec::new())).collect();
    for round in 0..runs {
        // Rotate the order each round so no variant always follows the same one.
        for i in 0..samples.len() {
            let k = (i + round) % samples.len();
            let v = samples[k].0;
            let s = boot(a, &images, v, rt)?;
            samples[k].1.push(s);
        }
    }
    Ok(ImageResults { samples, sizes })
}

impl ImageResults {
    fn col(&self, v: Variant, f: fn(&Sample) -> f64) -> Vec<f64> {
        self.samples
            .iter()
            .find(|(x, _)| *x == v)
            .map(|(_, s)| s.iter().map(f).collect())
            .unwrap_or_default()
    }

    pub fn insert(&self, r: &mut std::collections::BTreeMap<&'static str, serde_json::Value>) {
        for (v, boot_k, rss_k, avail_k) in [
            (
                Variant::Initrd,
                "image_initrd_boot_to_agent_ms",
                "image_initrd_vmm_rss_kib",
                "image_initrd_guest_mem_available_kib",
            ),
            (
                Variant::Erofs,
                "image_erofs_boot_to_agent_ms",
                "image_erofs_vmm_rss_kib",
                "image_erofs_guest_mem_available_kib",
            ),
            (
                Variant::Ext4,
                "image_ext4_boot_to_agent_ms",
                "image_ext4_vmm_rss_kib",
                "image_ext4_guest_mem_available_kib",
            ),
        ] {
            r.insert(boot_k, median(&self.col(v, |s| s.boot_ms)).round().into());
            r.insert(rss_k, median(&self.col(v, |s| s.rss_kib)).round().into());
            r.insert(
                avail_k,
                median(&self.col(v, |s| s.avail_kib)).round().into(),
            );
        }
        let ib = median(&self.col(Variant::Initrd, |s| s.boot_ms));
        let eb = median(&self.col(Variant::Erofs, |s| s.boot_ms));
        r.insert("image_erofs_boot_vs_initrd", r2(ib / eb).into());
    }

    pub fn print(&self) {
        let runs = self.samples.first().map_or(0, |(_, s)| s.len());
        println!();
        println!(
            "Guest image ({runs} boots each, rotated order, 1 vCPU, {GUEST_MIB} MiB; medians (min–max)):"
        );
        println!("| image | size, KiB | boot → agent Ping, ms | VMM RSS, KiB | guest MemAvailable, KiB |");
        println!("|---|---|---|---|---|");
        for (v, size) in &self.sizes {
            println!(
                "| {} | {} | {} | {} | {} |",
                v.name(),
                size / 1024,
                summary(&self.col(*v, |s| s.boot_ms), 0),
                summary(&self.col(*v, |s| s.rss_kib), 0),
                summary(&self.col(*v, |s| s.avail_kib), 0)
            );
        }
    }
}
