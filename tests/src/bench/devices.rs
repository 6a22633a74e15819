//! Device benchmarks: fio on virtio-blk and iperf3 over a tap, husk-vmm against QEMU `-M microvm`
//! booting the same kernel and the same benchmark image; the virtio-fs share against reading the same
//! files directly on the host. A round boots husk-vmm and QEMU with blk + net (every other kept
//! round QEMU first, so slow drifts of a shared machine hit both sides alike), then husk-vmm with
//! the share only, then probes the share directly on the host. A round whose VM fails is dropped
//! whole and another is made, up to twice as many attempts as rounds asked for.
//!
//! Everything the devices read lives on the host's tmpfs (the test host's /tmp): the 256 MiB raw
//! disk image and the shared directory. Both VMMs then serve the guest from the host page cache, so
//! the numbers measure the VMM's device path rather than a host disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use husk_tests::virtiofsd::Virtiofsd;
use husk_tests::{
    line_reader, median, read_lines_until, wait_child, Artifacts, GuestImage, KernelSymbols,
    VmOptions, VmProcess,
};

use super::util::{built, field, r2, summary, workdir, write_pattern, Daemon, Tap};

const TAP: &str = "hbench0";
const HOST_IP: &str = "10.91.0.1";
const GUEST_IP: &str = "10.91.0.2";
const FS_TAG: &str = "benchfs";
/// Round trips per eventfd hop measurement (well under a second in the test host).
const HOP_TRIPS: usize = 2000;
/// Guest RAM for both peers (fio and iperf3 with their libraries run from the tools disk).
const GUEST_MIB: u64 = 512;
const DATA_IMAGE_MIB: usize = 256;
const SHARE_BIG_MIB: usize = 64;
const SHARE_FILES: usize = 1000;
/// Upper bound for one benchmark VM (boot, fio, iperf3, fs probe) in the nested test host; a
/// round takes 1–2 minutes per VM.
const VM_TIMEOUT: Duration = Duration::from_secs(480);
/// A benchmark guest prints a line after each workload (each takes `secs` plus start-up) and boots
/// in well under a minute: a console silent this long belongs to a guest that stopped.
const VM_QUIET: Duration = Duration::from_secs(120);
/// Register samples taken of a guest that stopped (pause, read, resume), and their spacing.
const STUCK_SAMPLES: usize = 5;
const STUCK_SAMPLE_EVERY: Duration = Duration::from_millis(300);
/// Attempts per kept round: rounds whose VM fails are retried up to `runs * this` attempts in all.
const ATTEMPTS_PER_ROUND: usize = 2;

/// One boot of the benchmark image.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct VmSample {
    seq_mbps: f64,
    seq_iops: f64,
    rand_mbps: f64,
    rand_iops: f64,
    net_mbit: f64,
    fs: Option<FsSample>,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct FsSample {
    read_mbps: f64,
    /// Microseconds per lstat.
    stat_us: f64,
    /// Guest only: the same read after an unmount and the guest dropping its caches, so the share
    /// is cold again but the guest RAM the first read filled is already backed in L1 and mapped
    /// in the nested page tables (first touches of guest pages are expensive nested faults).
    #[serde(default)]
    read_again_mbps: Option<f64>,
}

pub struct Setup {
    dir: tempfile::TempDir,
    initrd: PathBuf,
    tools: PathBuf,
    fsprobe: PathBuf,
    data: PathBuf,
    share: PathBuf,
    _tap: Tap,
    secs: u32,
    /// The guest kernel's symbols, to say where a guest that stopped was running.
    syms: Option<KernelSymbols>,
}

impl Setup {
    pub fn new(a: &Artifacts, secs: u32) -> anyhow::Result<Self> {
        let hint = "run 'make bench-image'";
        let initrd = built("build/testhost/bench-initrd.img", hint)?;
        let tools = built("build/testhost/bench-tools.erofs", hint)?;
        let fsprobe = built("build/testhost/bench-fsprobe", hint)?;
        // Fail before any VM boots if the daemon is missing.
        husk_tests::virtiofsd::virtiofsd_path()?;
        let dir = workdir("husk-bench-dev-")?;
        let data = dir.path().join("data.img");
        write_pattern(&data, DATA_IMAGE_MIB << 20, 0x9e37_79b9)?;
        let share = dir.path().join("share");
        std::fs::create_dir_all(share.join("many"))?;
        write_pattern(&share.join("big"), SHARE_BIG_MIB << 20, 0x51_7cc1)?;
        for i in 0..SHARE_FILES {
            std::fs::write(share.join(format!("many/f{i:04}")), format!("file {i}\n"))?;
        }
        let tap = Tap::create(TAP, &format!("{HOST_IP}/24"))?;
        let syms = KernelSymbols::load(&a.kernel)
            .map_err(|e| eprintln!("[bench] guest addresses stay unnamed: {e}"))
            .ok();
        Ok(Setup {
            dir,
            initrd,
            tools,
            fsprobe,
            data,
            share,
            _tap: tap,
            secs,
            syms,
        })
    }

    /// The blk + net workloads (the same for both VMMs).
    fn guest_vars(&self) -> String {
        format!(
            "bench_blk=1 bench_ip={GUEST_IP} bench_server={HOST_IP} bench_secs={}",
            self.secs
        )
    }

    fn iperf_server(&self, round: usize, peer: &str) -> anyhow::Result<(Daemon, PathBuf)> {
        let out = self.dir.path().join(format!("iperf-{peer}-{round}.json"));
        let d = Daemon::spawn(
            "iperf3 server",
            Command::new("iperf3")
                .args(["-s", "-1", "-B", HOST_IP, "-J"])
                .stdout(std::fs::File::create(&out)?)
                .stderr(Stdio::null()),
        )?;
        Ok((d, out))
    }

    /// husk-vmm with the same devices as the QEMU peer (blk + net). The share gets its own VM
    /// ([`Self::husk_fs`]): with a share, guest RAM becomes a shared memfd instead of the
    /// anonymous memory QEMU uses here, which must not colour the blk/net comparison.
    fn husk(&self, a: &Artifacts, round: usize) -> anyhow::Result<VmSample> {
        let (mut iperf, iperf_out) = self.iperf_server(round, "husk")?;
        let opts = VmOptions {
            mem_mib: GUEST_MIB,
            image: GuestImage::Initrd(self.initrd.clone()),
            extra_cmdline: Some(self.guest_vars()),
            console_to_pipe: true,
            control_socket: true,
            extra_args: vec![
                "--disk".into(),
                format!("path={},ro,id=bench-data", self.data.display()),
                "--disk".into(),
                format!("path={},ro,id=bench-tools", self.tools.display()),
                "--net".into(),
                format!("tap={TAP}"),
            ],
            ..VmOptions::agent(a)
        };
        let lines = self.run_husk(a, &opts, None)?;
        iperf.wait(Duration::from_secs(30))?;
        parse_vm(&lines, &iperf_out).context("husk benchmark VM")
    }

    /// husk-vmm with the virtio-fs share only: the guest mounts it and runs bench-fsprobe.
    fn husk_fs(&self, a: &Artifacts, round: usize) -> anyhow::Result<FsSample> {
        // --cache auto: what a pod's share would use (the guest may cache, the host may change
        // files under it within the attribute timeout).
        let mut vfsd = Virtiofsd::try_start(
            self.dir.path(),
            &self.share,
            &format!("virtiofsd-{round}"),
            "auto",
            false,
        )?;
        let opts = VmOptions {
            mem_mib: GUEST_MIB,
            image: GuestImage::Initrd(self.initrd.clone()),
            extra_cmdline: Some(format!("bench_tag={FS_TAG}")),
            console_to_pipe: true,
            control_socket: true,
            extra_args: vfsd.fs_arg(FS_TAG),
            ..VmOptions::agent(a)
        };
        let lines = self.run_husk(a, &opts, Some(vfsd.log_path()))?;
        let _ = vfsd.wait_exit(Duration::from_secs(10));
        let get = |name: &str| bench_line(&lines, name);
        let mut sample =
            fs_sample(get("fs_read")?, get("fs_stat")?).context("husk virtio-fs VM")?;
        sample.read_again_mbps = Some(read_mbps(get("fs_read_again")?)?);
        Ok(sample)
    }

    /// Boots the benchmark image under husk-vmm and returns its console up to BENCH-DONE.
    fn run_husk(
        &self,
        a: &Artifacts,
        opts: &VmOptions,
        daemon_log: Option<&Path>,
    ) -> anyhow::Result<Vec<String>> {
        let mut vm = VmProcess::spawn(a, opts)?;
        let lines = match vm.console_until_quiet("BENCH-DONE", VM_TIMEOUT, VM_QUIET) {
            Ok(l) => l,
            Err(e) => {
                let threads = vm.thread_dump();
                let vcpus = vm.vcpu_samples(STUCK_SAMPLES, STUCK_SAMPLE_EVERY, self.syms.as_ref());
                vm.kill();
                bail!(
                    "husk benchmark VM: {e}\nguest vCPUs:\n{vcpus}husk-vmm threads:\n{threads}stderr: {}\nvirtiofsd: {}",
                    vm.stderr(),
                    daemon_log
                        .and_then(|l| std::fs::read_to_string(l).ok())
                        .unwrap_or_default()
                );
            }
        };
        let status = vm.wait_exit(Duration::from_secs(60))?;
        if !status.success() {
            bail!("husk-vmm exited with {status}: {}", vm.stderr());
        }
        Ok(lines)
    }

    fn qemu(&self, a: &Artifacts, round: usize) -> anyhow::Result<VmSample> {
        let (mut iperf, iperf_out) = self.iperf_server(round, "qemu")?;
        // QEMU's human monitor, to read the registers of a guest that stopped.
        let monitor = self.dir.path().join(format!("qemu-monitor-{round}.sock"));
        // The husk guest command line with QEMU's end of the VM: `-no-reboot` turns the guest's
        // triple-fault reboot into QEMU's exit. acpi=off: the guest kernel has no ACPI, and QEMU
        // then announces its virtio-mmio devices on the command line, as husk-vmm does.
        // cache=writeback (QEMU's default) and husk-vmm's plain pread both read through the host
        // page cache; QEMU does its I/O on its thread pool (aio=threads), husk-vmm on its event loop.
        let cmdline = format!(
            "{} {}",
            husk_vmm::config::BASE_CMDLINE.replace("reboot=k", "reboot=t"),
            self.guest_vars()
        );
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host"])
            .args(["-m", &GUEST_MIB.to_string(), "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-serial", "stdio"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .arg("-kernel")
            .arg(&a.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(cmdline)
            .arg("-drive")
            .arg(format!(
                "id=data,file={},format=raw,if=none,readonly=on",
                self.data.display()
            ))
            .args(["-device", "virtio-blk-device,drive=data,serial=bench-data"])
            .arg("-drive")
            .arg(format!(
                "id=tools,file={},format=raw,if=none,readonly=on",
                self.tools.display()
            ))
            .args([
                "-device",
                "virtio-blk-device,drive=tools,serial=bench-tools",
            ])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={TAP},script=no,downscript=no"),
            ])
            .args(["-device", "virtio-net-device,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let rx = line_reader(child.stdout.take().context("qemu stdout")?);
        let mut lines = Vec::new();
        if let Err(e) = read_lines_until(&rx, "BENCH-DONE", VM_TIMEOUT, VM_QUIET, |_, l| {
            lines.push(l)
        }) {
            // With -no-reboot, a guest triple fault ends QEMU silently with status 0 (the
            // output closes); a stopped guest leaves QEMU running: ask it where the vCPU is.
            let vcpus = if matches!(child.try_wait(), Ok(None)) {
                qemu_vcpu_samples(&monitor, self.syms.as_ref())
            } else {
                "QEMU exited first\n".into()
            };
            let _ = child.kill();
            let status = child.wait();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("QEMU benchmark VM did not finish ({status:?}): {e}\nguest vCPU:\n{vcpus}stderr: {err}");
        }
        wait_child(&mut child, Duration::from_secs(60), "qemu")?;
        iperf.wait(Duration::from_secs(30))?;
        parse_vm(&lines, &iperf_out).context("QEMU benchmark VM")
    }

    /// The shared directory read directly on the host, with the same probe binary as the guest.
    fn host_fs(&self) -> anyhow::Result<FsSample> {
        let probe = |mode: &str, path: &Path| -> anyhow::Result<String> {
            let out = Command::new(&self.fsprobe).arg(mode).arg(path).output()?;
            if !out.status.success() {
                bail!(
                    "bench-fsprobe {mode}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let read = probe("read", &self.share.join("big"))?;
        let stat = probe("stat", &self.share.join("many"))?;
        fs_sample(&read, &stat)
    }
}

/// [`STUCK_SAMPLES`] register samples of a QEMU guest through its human monitor (`info registers`
/// stops the vCPU for the read, as husk-vmm's `vcpus` does): RIP named from the kernel symbols,
/// the interrupt flag and whether the vCPU is halted.
fn qemu_vcpu_samples(monitor: &Path, syms: Option<&KernelSymbols>) -> String {
    let mut out = String::new();
    for i in 0..STUCK_SAMPLES {
        if i > 0 {
            std::thread::sleep(STUCK_SAMPLE_EVERY);
        }
        match qemu_registers(monitor) {
            Ok(regs) => {
                let field = |name: &str| {
                    regs.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .and_then(|v| u64::from_str_radix(v, 16).ok())
                };
                let rip = field("RIP=").unwrap_or(0);
                let interrupts = match field("RFL=") {
                    Some(f) if f & (1 << 9) != 0 => "on",
                    Some(_) => "off",
                    None => "?",
                };
                out.push_str(&format!(
                    "sample {i} rip={rip:#x} {} interrupts={interrupts} halted={}\n",
                    syms.map_or_else(String::new, |s| s.name(rip)),
                    field("HLT=").map_or("?".into(), |h| h.to_string()),
                ));
            }
            Err(e) => out.push_str(&format!("sample {i}: {e:#}\n")),
        }
    }
    out
}

/// The answer to `info registers` on QEMU's human monitor socket.
fn qemu_registers(monitor: &Path) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(monitor)
        .with_context(|| format!("connecting to {}", monitor.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"info registers\n")?;
    // The banner and prompt come first; the registers end with the next prompt.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("HLT=") || !got.ends_with(b"(qemu) ") {
        let n = s.read(&mut buf).context("reading the QEMU monitor")?;
        if n == 0 || got.len() > 64 << 10 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// A number `key=N` in a bench-fsprobe line.
fn probe_field(line: &str, key: &str) -> anyhow::Result<f64> {
    field(line, key)
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no {key}= in {line:?}"))
}

/// MB/s of a bench-fsprobe `read` line, which must have read the whole big file.
fn read_mbps(read: &str) -> anyhow::Result<f64> {
    let (bytes, read_ns) = (probe_field(read, "bytes")?, probe_field(read, "ns")?);
    if bytes != (SHARE_BIG_MIB << 20) as f64 {
        bail!("the probe read {bytes} bytes: {read:?}");
    }
    Ok(bytes / read_ns * 1000.0)
}

fn fs_sample(read: &str, stat: &str) -> anyhow::Result<FsSample> {
    let (files, stat_ns) = (probe_field(stat, "files")?, probe_field(stat, "ns")?);
    if files != SHARE_FILES as f64 {
        bail!("the probe saw {files} files: {stat:?}");
    }
    Ok(FsSample {
        read_mbps: read_mbps(read)?,
        stat_us: stat_ns / files / 1000.0,
        read_again_mbps: None,
    })
}

/// fio's terse (v3) line: field 6 is the read bandwidth in KiB/s, field 7 the read IOPS.
fn fio(line: &str) -> anyhow::Result<(f64, f64)> {
    let f: Vec<&str> = line.split(';').collect();
    if f.len() < 8 || !f[0].ends_with('3') || f[4] != "0" {
        bail!("unexpected fio output: {line:?}");
    }
    let bw_kib: f64 = f[6].parse()?;
    let iops: f64 = f[7].parse()?;
    Ok((bw_kib * 1024.0 / 1e6, iops))
}

/// The rest of the console line `BENCH <name> ...`.
fn bench_line<'a>(lines: &'a [String], name: &str) -> anyhow::Result<&'a str> {
    let tag = format!("BENCH {name} ");
    lines
        .iter()
        .find_map(|l| l.split_once(&tag).map(|(_, r)| r))
        .with_context(|| format!("no {name} result; console:\n{}", lines.join("\n")))
}

fn parse_vm(lines: &[String], iperf_json: &Path) -> anyhow::Result<VmSample> {
    let get = |name: &str| bench_line(lines, name);
    let (seq_mbps, seq_iops) = fio(get("blk_seqread")?)?;
    let (rand_mbps, rand_iops) = fio(get("blk_randread")?)?;
    let net = get("net_tcp")?;
    if !net.starts_with("ok") {
        bail!("iperf3 in the guest failed: {net}");
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(iperf_json).context("reading the iperf3 server's report")?,
    )
    .context("parsing the iperf3 server's report")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report without end.sum_received.bits_per_second")?;
    Ok(VmSample {
        seq_mbps,
        seq_iops,
        rand_mbps,
        rand_iops,
        net_mbit: bps / 1e6,
        fs: None,
    })
}

/// All rounds, and what the table and results.json get from them.
pub struct DeviceResults {
    husk: Vec<VmSample>,
    qemu: Vec<VmSample>,
    host: Vec<FsSample>,
    /// The daemon → VMM eventfd wake-up that vhost-user adds per request, µs (one per round).
    hop_us: Vec<f64>,
    secs: u32,
    /// Attempts (1-based) dropped because a VM failed.
    failed: Vec<usize>,
}

/// Kept rounds and failed attempts so far, saved after every attempt when `HUSK_BENCH_PROGRESS`
/// names a file: when L1 itself dies mid-run (its kernel has oopsed and hung under TCG), `make
/// bench` boots a new L1 and the run goes on from there. Each round pairs both peers on one L1, so
/// rounds from different L1 boots stay comparable. `key` ties the file to one commit and setting.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Progress {
    key: String,
    husk: Vec<VmSample>,
    qemu: Vec<VmSample>,
    host: Vec<FsSample>,
    hop_us: Vec<f64>,
    failed: Vec<usize>,
    attempts: usize,
}

impl Progress {
    fn load(path: Option<&Path>, key: &str) -> Self {
        let saved = path
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<Progress>(&b).ok())
            .filter(|p| p.key == key);
        match saved {
            Some(p) => {
                eprintln!(
                    "[bench] devices: going on from {} kept rounds and {} attempts of an earlier L1",
                    p.husk.len(),
                    p.attempts
                );
                p
            }
            None => Progress {
                key: key.to_string(),
                ..Progress::default()
            },
        }
    }

    fn save(&self, path: Option<&Path>) -> anyhow::Result<()> {
        let Some(path) = path else { return Ok(()) };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }
}

pub fn run(a: &Artifacts, runs: usize, secs: u32) -> anyhow::Result<DeviceResults> {
    let setup = Setup::new(a, secs)?;
    let progress_path = std::env::var_os("HUSK_BENCH_PROGRESS").map(PathBuf::from);
    let key = format!(
        "commit={} runs={runs} secs={secs}",
        std::env::var("HUSK_BENCH_COMMIT").unwrap_or_else(|_| "unknown".into())
    );
    let mut p = Progress::load(progress_path.as_deref(), &key);
    let max_attempts = runs * ATTEMPTS_PER_ROUND;
    while p.husk.len() < runs && p.attempts < max_attempts {
        p.attempts += 1;
        let attempt = p.attempts;
        // QEMU first in every other kept round.
        match run_round(&setup, a, attempt, p.husk.len() % 2 == 1) {
            Ok((h, q, fs)) => {
                eprintln!(
                    "[bench] devices round {}/{runs} (attempt {attempt}): husk {h:?} qemu {q:?} host fs {fs:?}",
                    p.husk.len() + 1
                );
                p.husk.push(h);
                p.qemu.push(q);
                p.host.push(fs);
                p.hop_us.push(super::eventfd_hop::median_hop_us(HOP_TRIPS)?);
            }
            // A guest that dies under nested emulation (it happens to either peer, rarely)
            // costs its attempt, not the run: the attempt is dropped whole so the peers stay
            // paired, and another one is made.
            Err(e) => {
                eprintln!("[bench] devices attempt {attempt}/{max_attempts} FAILED: {e:#}");
                p.failed.push(attempt);
            }
        }
        p.save(progress_path.as_deref())?;
    }
    if p.husk.len() * 2 <= runs {
        bail!(
            "device benchmark: only {} of {} attempts finished ({:?} failed); see the messages above",
            p.husk.len(),
            p.attempts,
            p.failed
        );
    }
    Ok(DeviceResults {
        husk: p.husk,
        qemu: p.qemu,
        host: p.host,
        hop_us: p.hop_us,
        secs,
        failed: p.failed,
    })
}

/// One round: a husk VM and a QEMU VM (order alternating), a husk VM with the share, the host fs.
fn run_round(
    setup: &Setup,
    a: &Artifacts,
    round: usize,
    qemu_first: bool,
) -> anyhow::Result<(VmSample, VmSample, FsSample)> {
    // The caller alternates which VMM goes first: a drift in the machine's load then favours
    // neither.
    let (mut husk, qemu) = if qemu_first {
        let q = setup.qemu(a, round)?;
        (setup.husk(a, round)?, q)
    } else {
        let h = setup.husk(a, round)?;
        (h, setup.qemu(a, round)?)
    };
    husk.fs = Some(setup.husk_fs(a, round)?);
    Ok((husk, qemu, setup.host_fs()?))
}

impl DeviceResults {
    fn col(v: &[VmSample], f: impl Fn(&VmSample) -> f64) -> Vec<f64> {
        v.iter().map(f).collect()
    }

    /// Median over the rounds of husk ÷ QEMU within each round: the peers of one round ran back
    /// to back, so this cancels load bursts that the ratio of the two medians does not.
    fn paired(&self, f: impl Fn(&VmSample) -> f64) -> f64 {
        let r: Vec<f64> = self
            .husk
            .iter()
            .zip(&self.qemu)
            .map(|(h, q)| f(h) / f(q))
            .collect();
        median(&r)
    }

    fn guest_fs(&self) -> Vec<FsSample> {
        self.husk.iter().filter_map(|s| s.fs).collect()
    }

    /// Keys for results.json: absolute medians of both peers and the ratios (husk ÷ peer, higher is
    /// better for husk).
    pub fn insert(&self, r: &mut std::collections::BTreeMap<&'static str, serde_json::Value>) {
        let m = |v: Vec<f64>| median(&v);
        let (h, q) = (&self.husk, &self.qemu);
        let hs = m(Self::col(h, |s| s.seq_mbps));
        let qs = m(Self::col(q, |s| s.seq_mbps));
        let hr = m(Self::col(h, |s| s.rand_iops));
        let qr = m(Self::col(q, |s| s.rand_iops));
        let hn = m(Self::col(h, |s| s.net_mbit));
        let qn = m(Self::col(q, |s| s.net_mbit));
        let gfs = self.guest_fs();
        let gread = median(&gfs.iter().map(|s| s.read_mbps).collect::<Vec<_>>());
        let gstat = median(&gfs.iter().map(|s| s.stat_us).collect::<Vec<_>>());
        let gagain = median(
            &gfs.iter()
                .filter_map(|s| s.read_again_mbps)
                .collect::<Vec<_>>(),
        );
        let hread = median(&self.host.iter().map(|s| s.read_mbps).collect::<Vec<_>>());
        let hstat = median(&self.host.iter().map(|s| s.stat_us).collect::<Vec<_>>());
        for (k, v) in [
            ("blk_seqread_husk_mbps", hs),
            ("blk_seqread_qemu_mbps", qs),
            ("blk_seqread_vs_qemu", hs / qs),
            ("blk_randread_husk_iops", hr),
            ("blk_randread_qemu_iops", qr),
            ("blk_randread_vs_qemu", hr / qr),
            ("net_tcp_husk_mbit", hn),
            ("net_tcp_qemu_mbit", qn),
            ("net_tcp_vs_qemu", hn / qn),
            ("fs_seqread_guest_mbps", gread),
            ("fs_seqread_host_mbps", hread),
            ("fs_seqread_vs_host", gread / hread),
            ("fs_seqread_again_guest_mbps", gagain),
            ("fs_seqread_again_vs_host", gagain / hread),
            ("fs_stat_guest_us", gstat),
            ("fs_stat_host_us", hstat),
            ("fs_stat_vs_host", hstat / gstat),
            ("fs_vhost_hop_us", median(&self.hop_us)),
            ("fs_vhost_hop_vs_stat", median(&self.hop_us) / gstat),
        ] {
            r.insert(k, r2(v).into());
        }
        for (k, v) in [
            ("blk_seqread_vs_qemu_paired", self.paired(|s| s.seq_mbps)),
            ("blk_randread_vs_qemu_paired", self.paired(|s| s.rand_iops)),
            ("net_tcp_vs_qemu_paired", self.paired(|s| s.net_mbit)),
        ] {
            r.insert(k, r2(v).into());
        }
        r.insert("device_runs", self.husk.len().into());
        r.insert("device_rounds_failed", self.failed.len().into());
        r.insert("device_run_secs", self.secs.into());
    }

    pub fn print(&self) {
        let (h, q) = (&self.husk, &self.qemu);
        let s = |v: &[VmSample], f: fn(&VmSample) -> f64, d| summary(&Self::col(v, f), d);
        let ratio = |a: Vec<f64>, b: Vec<f64>| median(&a) / median(&b);
        println!();
        let dropped = if self.failed.is_empty() {
            String::new()
        } else {
            format!(
                ", attempts {:?} of {} dropped: a VM failed",
                self.failed,
                self.husk.len() + self.failed.len()
            )
        };
        println!(
            "Devices ({} rounds, peers interleaved; fio and iperf3 {} s each; medians (min–max){dropped}):",
            h.len(),
            self.secs
        );
        println!("| benchmark | husk-vmm | QEMU -M microvm | husk ÷ QEMU (of medians) | median of per-round husk ÷ QEMU |");
        println!("|---|---|---|---|---|");
        println!(
            "| virtio-blk seq read 1 MiB, QD4, MB/s | {} | {} | {:.2} | {:.2} |",
            s(h, |x| x.seq_mbps, 1),
            s(q, |x| x.seq_mbps, 1),
            ratio(Self::col(h, |x| x.seq_mbps), Self::col(q, |x| x.seq_mbps)),
            self.paired(|x| x.seq_mbps)
        );
        println!(
            "| virtio-blk seq read 1 MiB, QD4, IOPS | {} | {} | | |",
            s(h, |x| x.seq_iops, 0),
            s(q, |x| x.seq_iops, 0)
        );
        println!(
            "| virtio-blk rand read 4 KiB, QD16, IOPS | {} | {} | {:.2} | {:.2} |",
            s(h, |x| x.rand_iops, 0),
            s(q, |x| x.rand_iops, 0),
            ratio(Self::col(h, |x| x.rand_iops), Self::col(q, |x| x.rand_iops)),
            self.paired(|x| x.rand_iops)
        );
        println!(
            "| virtio-blk rand read 4 KiB, QD16, MB/s | {} | {} | | |",
            s(h, |x| x.rand_mbps, 2),
            s(q, |x| x.rand_mbps, 2)
        );
        println!(
            "| virtio-net TCP guest→host (iperf3), Mbit/s | {} | {} | {:.2} | {:.2} |",
            s(h, |x| x.net_mbit, 1),
            s(q, |x| x.net_mbit, 1),
            ratio(Self::col(h, |x| x.net_mbit), Self::col(q, |x| x.net_mbit)),
            self.paired(|x| x.net_mbit)
        );
        let g = self.guest_fs();
        let col = |v: &[FsSample], f: fn(&FsSample) -> f64| v.iter().map(f).collect::<Vec<_>>();
        println!();
        println!("| shared fs (virtio-fs, virtiofsd --cache auto, cold guest cache) | guest | host directly | guest ÷ host |");
        println!("|---|---|---|---|");
        println!(
            "| sequential read of a {SHARE_BIG_MIB} MiB file, MB/s | {} | {} | {:.3} |",
            summary(&col(&g, |x| x.read_mbps), 1),
            summary(&col(&self.host, |x| x.read_mbps), 1),
            median(&col(&g, |x| x.read_mbps)) / median(&col(&self.host, |x| x.read_mbps))
        );
        let again: Vec<f64> = g.iter().filter_map(|x| x.read_again_mbps).collect();
        println!(
            "| the same read again after unmounting and dropping the guest's caches (guest RAM already touched), MB/s | {} | {} | {:.3} |",
            summary(&again, 1),
            summary(&col(&self.host, |x| x.read_mbps), 1),
            median(&again) / median(&col(&self.host, |x| x.read_mbps))
        );
        println!(
            "| lstat of {SHARE_FILES} files, µs per file | {} | {} | {:.3} |",
            summary(&col(&g, |x| x.stat_us), 1),
            summary(&col(&self.host, |x| x.stat_us), 2),
            median(&col(&self.host, |x| x.stat_us)) / median(&col(&g, |x| x.stat_us))
        );
        // What an in-VMM FUSE server would save per request (docs/shared-fs.md, "Decision").
        let hop = median(&self.hop_us);
        println!(
            "| vhost-user's extra hop (daemon → VMM eventfd wake-up), µs per request | {:.0}% of a guest lstat | {} | |",
            100.0 * hop / median(&col(&g, |x| x.stat_us)),
            summary(&self.hop_us, 1),
        );
    }
}
