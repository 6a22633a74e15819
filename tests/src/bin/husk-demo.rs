//! `make demo`: a real container in a Husk microVM through a real containerd.
//!
//! Starts a private containerd 1.6 (its own root, state and socket), imports the offline busybox image, and
//! runs `ctr run --rm --runtime io.containerd.husk.v2 busybox ... uname -r`: the container sees the guest
//! kernel, not the host's. The same container under runc is timed next to it.

use std::time::Instant;

use anyhow::{ensure, Context};
use husk_tests::containerd::{busybox_image_tar, Containerd, ContainerdOptions, BUSYBOX_IMAGE};
use husk_tests::{in_nested_testhost, project_root, require_kvm, Artifacts};

const NS: &str = "husk-demo";

fn main() -> anyhow::Result<()> {
    let a = Artifacts::locate()?;
    require_kvm()?;
    let root = project_root();
    let virtiofsd = root.join("build/testhost/virtiofsd");
    ensure!(
        virtiofsd.is_file(),
        "{} is missing: run 'make testhost'",
        virtiofsd.display()
    );
    if in_nested_testhost() {
        println!(
            "(running in the nested test host: absolute times are 20-50x slower than on hardware)"
        );
    }
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("husk.toml");
    std::fs::write(
        &config,
        format!(
            "# The demo's Husk configuration (a node would use /etc/husk/config.toml)\n\
             kernel = {:?}\nrootfs = {:?}\nvmm = {:?}\nvirtiofsd = {:?}\nvcpus = 1\nmemory_mib = 256\n",
            a.kernel, a.rootfs, a.vmm, virtiofsd
        ),
    )?;
    let t = Instant::now();
    let ctd = Containerd::start(&ContainerdOptions {
        extra_path: vec![root.join("target/release")],
        env: vec![("HUSK_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    })?;
    println!(
        "containerd {} ready in {} ms",
        ctd.dir().display(),
        t.elapsed().as_millis()
    );
    let t = Instant::now();
    ctd.import_image(NS, &busybox_image_tar()?)?;
    println!(
        "imported {BUSYBOX_IMAGE} (built offline) in {} ms",
        t.elapsed().as_millis()
    );

    let script = "echo \"kernel $(uname -r), $(nproc) CPU(s), $(grep MemTotal /proc/meminfo)\"";
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    println!("host kernel: {}", host_release.trim());
    for (runtime, id) in [
        ("io.containerd.husk.v2", "demo-husk"),
        ("io.containerd.runc.v2", "demo-runc"),
    ] {
        let t = Instant::now();
        let out = ctd
            .ctr_ok(
                NS,
                [
                    "run",
                    "--rm",
                    "--runtime",
                    runtime,
                    BUSYBOX_IMAGE,
                    id,
                    "sh",
                    "-c",
                    script,
                ],
            )
            .with_context(|| format!("ctr run with {runtime}"))?;
        println!(
            "{runtime:>22}: {} ({} ms for ctr run --rm)",
            String::from_utf8_lossy(&out.stdout).trim(),
            t.elapsed().as_millis()
        );
        if runtime.contains("husk") {
            let guest = String::from_utf8_lossy(&out.stdout);
            ensure!(
                !guest.contains(&format!("kernel {} ", host_release.trim())),
                "the Husk container saw the host's kernel"
            );
        }
    }
    Ok(())
}
