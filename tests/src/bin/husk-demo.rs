//! `make demo`: boots a Husk microVM, asks its agent over vsock who it is, shuts it down, with timings.

use std::time::{Duration, Instant};

use anyhow::Context;
use husk_tests::{in_nested_testhost, require_kvm, Artifacts, VmOptions, VmProcess};

fn main() -> anyhow::Result<()> {
    let a = Artifacts::locate()?;
    require_kvm()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    if in_nested_testhost() {
        println!(
            "(running in the nested test host: absolute times are 20-50x slower than on hardware)"
        );
    }
    let opts = VmOptions {
        vcpus: 2,
        mem_mib: 256,
        ..VmOptions::agent(&a)
    };
    let mut vm = VmProcess::spawn(&a, &opts)?;
    let client = rt
        .block_on(vm.connect_agent(Duration::from_secs(90)))
        .with_context(|| format!("the agent did not answer; console:\n{}", vm.console()))?;
    let ready = vm.started.elapsed();
    let t = Instant::now();
    let ping = rt.block_on(client.ping())?;
    let ping_rtt = t.elapsed();
    let info = rt.block_on(client.guest_info())?;
    println!("husk-vmm pid {}, 2 vCPUs, 256 MiB", vm.pid());
    println!(
        "agent {} (API v{}) ready {} ms after VMM start",
        ping.agent_version,
        ping.api_version,
        ready.as_millis()
    );
    println!(
        "guest kernel: {} (host kernel: {})",
        info.kernel_release,
        host_release.trim()
    );
    println!(
        "guest: {} CPUs, {} MiB total, {} MiB available, up {} ms",
        info.online_cpus,
        info.mem_total_bytes >> 20,
        info.mem_available_bytes >> 20,
        info.uptime.as_millis()
    );
    println!("ping round trip over vsock: {} us", ping_rtt.as_micros());
    if let Some(rss) = vm.rss_kib() {
        println!("VMM resident memory: {} MiB", rss / 1024);
    }
    let t = Instant::now();
    rt.block_on(client.shutdown())?;
    drop(client);
    let status = vm.wait_exit(Duration::from_secs(60))?;
    println!(
        "guest shut down in {} ms; husk-vmm exited with {status}",
        t.elapsed().as_millis()
    );
    anyhow::ensure!(status.success(), "husk-vmm failed: {}", vm.stderr());
    Ok(())
}
