//! `make bench`: husk-vmm next to QEMU `-M microvm` booting the same kernel, measured in the same run on
//! the same host: boot time and memory, the guest image choice (initrd vs erofs/ext4 on virtio-blk),
//! virtio-blk (fio), virtio-net (iperf3) and the shared fs against the host (tests/src/bench/). Prints
//! tables and writes a flat JSON object (docs/benchmarks.md).
//!
//! Environment: `HUSK_BENCH_RUNS` (samples/rounds per figure, default 5), `HUSK_BENCH_SECS` (seconds per
//! fio and iperf3 run, default 5), `HUSK_BENCH_ONLY` (comma list of `boot`, `image`, `devices`).
//!
//! Inside the nested test host every guest exit is emulated twice, so absolute times are far above real
//! hardware: only the ratios between peers measured here are meaningful.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

#[path = "../bench/mod.rs"]
mod bench;
use husk_tests::{
    in_nested_testhost, line_reader, median, require_kvm, wait_child, Artifacts, GuestImage,
    VmOptions, VmProcess,
};

/// Firecracker's published boot-to-init figure on hardware, for reference only (not measured here).
const FIRECRACKER_PUBLISHED_BOOT_MS: f64 = 125.0;
const MARKER: &str = "HUSK-GUEST-INIT";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn husk_boot_to_agent(a: &Artifacts, rt: &tokio::runtime::Runtime) -> anyhow::Result<(f64, f64)> {
    let mut vm = VmProcess::spawn(a, &VmOptions::agent(a))?;
    let client = rt
        .block_on(vm.connect_agent(Duration::from_secs(90)))
        .with_context(|| format!("agent did not answer; console:\n{}", vm.console()))?;
    let boot = ms(vm.started.elapsed());
    let rss = vm.rss_kib().context("reading the VMM's RSS")? as f64;
    rt.block_on(client.shutdown())?;
    drop(client);
    let status = vm.wait_exit(Duration::from_secs(60))?;
    if !status.success() {
        bail!("husk-vmm exited with {status}: {}", vm.stderr());
    }
    Ok((boot, rss))
}

fn husk_boot_to_init(a: &Artifacts) -> anyhow::Result<f64> {
    let opts = VmOptions {
        image: GuestImage::Initrd(a.marker_initrd.clone()),
        console_to_pipe: true,
        ..VmOptions::agent(a)
    };
    let mut vm = VmProcess::spawn(a, &opts)?;
    let (t, _) = vm.wait_console_line(MARKER, Duration::from_secs(90))?;
    vm.wait_exit(Duration::from_secs(30))?;
    Ok(ms(t - vm.started))
}

fn qemu_boot_to_init(a: &Artifacts) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.marker_initrd)
        // The same command line husk-vmm gives the guest, except that QEMU's microvm ends on a triple
        // fault (`-no-reboot`) rather than on the i8042 reset.
        .arg("-append")
        .arg(husk_vmm::config::BASE_CMDLINE.replace("reboot=k", "reboot=t"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64 (Debian qemu-system-x86)")?;
    let lines = line_reader(child.stdout.take().context("qemu stdout")?);
    let deadline = Instant::now() + Duration::from_secs(90);
    let at = loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((t, l)) if l.contains(MARKER) => break t,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                bail!("QEMU did not reach the guest init");
            }
        }
    };
    wait_child(&mut child, Duration::from_secs(30), "qemu")?;
    Ok(ms(at - start))
}

/// The host's (test host's) 1/5/15-minute load averages, to judge how noisy a run was.
fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn boot_section(
    a: &Artifacts,
    rt: &tokio::runtime::Runtime,
    runs: usize,
    results: &mut BTreeMap<&str, serde_json::Value>,
) -> anyhow::Result<()> {
    // Warm the page cache so the first sample of each peer does not pay for reading the images.
    husk_boot_to_init(a)?;
    qemu_boot_to_init(a)?;

    let mut agent_boot = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        let (b, r) = husk_boot_to_agent(a, rt)?;
        agent_boot.push(b);
        rss.push(r);
    }
    // Interleaved, so both peers see the same load.
    let (mut husk_init, mut qemu_init) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        husk_init.push(husk_boot_to_init(a)?);
        qemu_init.push(qemu_boot_to_init(a)?);
    }

    let (boot_agent, rss_kib) = (median(&agent_boot), median(&rss));
    let (husk_i, qemu_i) = (median(&husk_init), median(&qemu_init));
    results.insert("boot_to_agent_ms", boot_agent.round().into());
    results.insert("husk_boot_to_init_ms", husk_i.round().into());
    results.insert("qemu_microvm_boot_ms", qemu_i.round().into());
    results.insert(
        "boot_vs_qemu",
        ((qemu_i / husk_i * 100.0).round() / 100.0).into(),
    );
    results.insert("vmm_rss_kib", rss_kib.round().into());

    println!("| metric                                  | husk-vmm | QEMU -M microvm | Firecracker (published, hw) |");
    println!("|-----------------------------------------|----------|-----------------|-----------------------------|");
    println!("| boot to guest init, ms (same kernel)    | {husk_i:>8.0} | {qemu_i:>15.0} | {FIRECRACKER_PUBLISHED_BOOT_MS:>27.0} |");
    println!(
        "| boot to agent answering Ping, ms        | {boot_agent:>8.0} | {:>15} | {:>27} |",
        "-", "-"
    );
    println!(
        "| VMM RSS with a 128 MiB guest, KiB       | {rss_kib:>8.0} | {:>15} | {:>27} |",
        "-", "-"
    );
    println!(
        "QEMU / husk boot-to-init ratio: {:.2} (higher: husk faster)",
        qemu_i / husk_i
    );
    println!(
        "samples: agent {agent_boot:.0?}, husk init {husk_init:.0?}, qemu init {qemu_init:.0?}"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut out = PathBuf::from("target/bench/results.json");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().context("--out needs a path")?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    let runs: usize = std::env::var("HUSK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let secs: u32 = std::env::var("HUSK_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let only = std::env::var("HUSK_BENCH_ONLY").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.split(',').any(|x| x.trim() == s);
    let a = Artifacts::locate()?;
    require_kvm()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nested = in_nested_testhost();
    let mut results: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
    results.insert("runs", runs.into());
    results.insert(
        "environment",
        if nested { "nested-test-host" } else { "direct" }.into(),
    );
    results.insert("load_avg_at_start", load_avg().into());
    println!(
        "Husk benchmarks ({runs} runs each, medians){}; load average at start {}",
        if nested {
            "; measured inside the nested test host (L1 under QEMU TCG): compare ratios, not absolute times"
        } else {
            ""
        },
        load_avg()
    );
    if want("boot") {
        boot_section(&a, &rt, runs, &mut results)?;
    }
    if want("image") {
        let r = bench::image::run(&a, runs, &rt)?;
        r.print();
        r.insert(&mut results);
    }
    if want("devices") {
        let r = bench::devices::run(&a, runs, secs)?;
        r.print();
        r.insert(&mut results);
    }
    results.insert("load_avg_at_end", load_avg().into());
    println!("load average at end {}", load_avg());

    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}
