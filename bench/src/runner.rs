//! Boot a workload VM, drive it with requests, check the answers and measure: the engine of
//! `kscope run`, `kscope demo` and the benchmarks.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kscope_guest::abi::request::kind;
use kscope_vmm::{PendingResponse, Vm, VmConfig};
use kscope_workloads::Workload;
use serde::Serialize;

use kscope_vmm::summary::LatencySummary;

/// How long one request may take before the VM is declared unresponsive.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a boot may take.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The root image with every workload program, the guest agent and the default data, shared
/// by every VM of this process.
pub fn image() -> Arc<[u8]> {
    static IMG: OnceLock<Arc<[u8]>> = OnceLock::new();
    IMG.get_or_init(|| Arc::from(kscope_workloads::default_image()))
        .clone()
}

/// The embedded guest kernel.
pub fn kernel() -> Arc<[u8]> {
    static K: OnceLock<Arc<[u8]>> = OnceLock::new();
    K.get_or_init(|| Arc::from(kscope_guest::KERNEL_ELF))
        .clone()
}

/// The kernel command line that runs `w` with the guest agent.
pub fn cmdline(w: Workload) -> String {
    let agent = if image_has("/bin/agent") {
        " agent=/bin/agent"
    } else {
        ""
    };
    format!("init={}{agent}", w.program_path())
}

fn image_has(path: &str) -> bool {
    static FILES: OnceLock<Vec<String>> = OnceLock::new();
    FILES
        .get_or_init(|| {
            kscope_guest::mkfs::list(&image())
                .map(|f| f.into_iter().map(|(p, _, _)| p).collect())
                .unwrap_or_default()
        })
        .iter()
        .any(|p| p == path)
}

/// Parse a workload name, with an error listing the valid ones.
pub fn parse_workload(name: &str) -> anyhow::Result<Workload> {
    Workload::from_name(name).with_context(|| {
        let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
        format!(
            "unknown workload {name:?}: choose one of {}",
            names.join(", ")
        )
    })
}

/// A booted workload VM and how long it took.
pub struct Booted {
    /// The VM.
    pub vm: Vm,
    /// When `Vm::boot` was called.
    pub started: Instant,
    /// Boot call to READY (the workload waits for requests).
    pub boot: Duration,
}

/// Boot `w` in a VM of `mem_bytes` and wait until it is ready.
pub fn boot(w: Workload, mem_bytes: u64, name: &str) -> anyhow::Result<Booted> {
    // The image and kernel are built once per process (data generation takes ~0.2 s); the
    // boot time measures the VM, not the image builder.
    let (kernel, disk, cmdline) = (kernel(), image(), cmdline(w));
    let started = Instant::now();
    let vm = Vm::boot(VmConfig {
        name: name.to_string(),
        mem_bytes,
        vcpus: 1,
        kernel,
        cmdline,
        disk,
        net: None,
        guest_mode: kscope_vmm::GuestMode::process_default(),
    })
    .with_context(|| format!("booting {} with {} MiB", w.name(), mem_bytes >> 20))?;
    vm.wait_ready(BOOT_TIMEOUT).with_context(|| {
        format!(
            "{} did not become ready; console:\n{}",
            w.name(),
            tail(&vm.serial_output(), 20)
        )
    })?;
    Ok(Booted {
        boot: started.elapsed(),
        vm,
        started,
    })
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Result of driving a VM with a request list.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DriveReport {
    /// Requests answered.
    pub requests: usize,
    /// Responses checked against host-computed answers.
    pub checked: usize,
    /// Wall time of the whole run.
    pub elapsed_ms: f64,
    /// Requests per second.
    pub throughput_rps: f64,
    /// Per-request latency (submit to response).
    pub latency: LatencySummary,
    /// Completion time of each request since the start, in order of completion (for warm-up
    /// curves).
    #[serde(skip)]
    pub completions: Vec<Duration>,
}

/// Send `reqs` to `vm` with up to `window` requests in flight; check each response with the
/// workload's host-side checker when `check` is set. Fails on the first wrong answer.
pub fn drive(
    vm: &Vm,
    w: Workload,
    reqs: &[Vec<u8>],
    window: usize,
    check: bool,
) -> anyhow::Result<DriveReport> {
    let start = Instant::now();
    let mut inflight: VecDeque<(usize, Instant, PendingResponse)> = VecDeque::new();
    let mut latencies = Vec::with_capacity(reqs.len());
    let mut completions = Vec::with_capacity(reqs.len());
    let mut checked = 0;
    let mut next = 0;
    while next < reqs.len() || !inflight.is_empty() {
        while next < reqs.len() && inflight.len() < window.max(1) {
            let p = vm
                .submit(kind::WORKLOAD, &reqs[next])
                .with_context(|| format!("submitting request {next}"))?;
            inflight.push_back((next, Instant::now(), p));
            next += 1;
        }
        let (i, sent, p) = inflight.pop_front().expect("in flight");
        let resp = p.wait(REQUEST_TIMEOUT).with_context(|| {
            format!(
                "request {i} ({}) got no answer; console:\n{}",
                preview(&reqs[i]),
                tail(&vm.serial_output(), 15)
            )
        })?;
        latencies.push(sent.elapsed());
        completions.push(start.elapsed());
        if resp.status != 0 {
            bail!(
                "request {i} ({}) failed with status {:#x}: {}",
                preview(&reqs[i]),
                resp.status,
                preview(&resp.payload)
            );
        }
        if check {
            w.check(&reqs[i], &resp.payload).map_err(|e| {
                anyhow::anyhow!("wrong answer to request {i} ({}): {e}", preview(&reqs[i]))
            })?;
            checked += 1;
        }
    }
    let elapsed = start.elapsed();
    Ok(DriveReport {
        requests: reqs.len(),
        checked,
        elapsed_ms: elapsed.as_secs_f64() * 1e3,
        throughput_rps: reqs.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        latency: LatencySummary::of(&latencies),
        completions,
    })
}

/// A short printable preview of a payload.
pub fn preview(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(60)]);
    let first = s.lines().next().unwrap_or("");
    if b.len() > 60 || s.lines().count() > 1 {
        format!("{first}...")
    } else {
        first.to_string()
    }
}

/// Everything `kscope run` reports.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Workload name.
    pub workload: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Boot call to READY.
    pub boot_ms: f64,
    /// Boot call to the first response.
    pub first_response_ms: f64,
    /// The CPU mode the guest kernel reported (native or emulated).
    pub cpu_mode: Option<kscope_vmm::CpuMode>,
    /// The measured run (after the first request).
    pub run: DriveReport,
}

/// Boot `w`, send one request (time to first response), then `n` more, checked.
pub fn run(w: Workload, mem_bytes: u64, n: usize, window: usize) -> anyhow::Result<RunReport> {
    let b = boot(w, mem_bytes, &format!("{}-run", w.name()))?;
    let reqs = w.requests(1, n + 1);
    let first = drive(&b.vm, w, &reqs[..1], 1, true)?;
    let first_response = b.started.elapsed();
    debug_assert_eq!(first.requests, 1);
    let run = drive(&b.vm, w, &reqs[1..], window, true)?;
    let cpu_mode = b.vm.cpu_mode();
    b.vm.stop().context("stopping the VM")?;
    Ok(RunReport {
        workload: w.name().to_string(),
        mem_mib: mem_bytes >> 20,
        boot_ms: b.boot.as_secs_f64() * 1e3,
        first_response_ms: first_response.as_secs_f64() * 1e3,
        cpu_mode,
        run,
    })
}
