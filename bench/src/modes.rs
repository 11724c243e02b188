//! `kscope bench modes`: what PVM's native switch changes for kscope's own paths, both CPU
//! modes side by side in one run (the emulated mode is the baseline).
//!
//! Per mode and repetition: boot of `/bin/ktest` to READY, a `getpid` round trip and an
//! anonymous page fault (timed inside the guest by ktest), a PING round trip (host -> kernel
//! -> host, no process), an echo round trip through a user process, the `web` workload's
//! throughput and time to first answer, and a lazy clone of a warm `web` parent: clone call to
//! the child's first answer, beside a cold boot's first answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kscope_guest::abi::kinfo::file_kind;
use kscope_guest::abi::request::kind;
use kscope_vmm::{CloneOptions, CpuMode, GuestMode, Vm, VmConfig};
use kscope_workloads::Workload;
use serde::Serialize;

use crate::runner;

const T: Duration = Duration::from_secs(60);

/// One mode's figures (medians over the repetitions, with min and max).
#[derive(Debug, Clone, Serialize)]
pub struct ModeFigures {
    /// The mode the kernels reported.
    pub mode: CpuMode,
    /// Each figure: (name, unit, [min, median, max]).
    pub figures: Vec<(String, String, [f64; 3])>,
}

/// Options of the run.
#[derive(Debug, Clone)]
pub struct ModesOptions {
    /// Repetitions per mode.
    pub reps: usize,
    /// `web` requests per throughput run.
    pub web_requests: usize,
    /// Guest memory of the web VMs.
    pub mem_bytes: u64,
}

fn ktest_image() -> anyhow::Result<Arc<[u8]>> {
    let prog = |p: &str| {
        kscope_guest::PROGRAMS
            .iter()
            .find(|(n, _)| *n == p)
            .map(|(_, b)| *b)
            .with_context(|| format!("{p} is not embedded"))
    };
    let mut b = kscope_guest::mkfs::FsBuilder::new();
    b.add("/bin/ktest", file_kind::EXEC, prog("/bin/ktest")?)
        .map_err(|e| anyhow::anyhow!("building the ktest image: {e:?}"))?;
    Ok(Arc::from(b.build()))
}

fn ask(vm: &Vm, cmd: &str) -> anyhow::Result<String> {
    let r = vm.request(kind::WORKLOAD, cmd.as_bytes(), T)?;
    if r.status != 0 {
        bail!("ktest {cmd:?} failed with status {}", r.status);
    }
    Ok(String::from_utf8_lossy(&r.payload).into_owned())
}

fn check_mode(vm: &Vm, want: CpuMode) -> anyhow::Result<()> {
    match vm.cpu_mode() {
        Some(m) if m == want => Ok(()),
        other => bail!("{}: kernel reports {other:?}, expected {want}", vm.name()),
    }
}

/// Samples of one repetition in `mode`.
fn one_rep(
    mode: CpuMode,
    o: &ModesOptions,
    out: &mut Vec<(String, String, f64)>,
) -> anyhow::Result<()> {
    let gm = match mode {
        CpuMode::Native => GuestMode::Native,
        CpuMode::Emulated => GuestMode::Emulated,
    };
    let t = Instant::now();
    let vm = Vm::boot(VmConfig {
        name: format!("modes-ktest-{mode}"),
        mem_bytes: 64 << 20,
        vcpus: 1,
        kernel: runner::kernel(),
        cmdline: "init=/bin/ktest".into(),
        disk: ktest_image()?,
        net: None,
        guest_mode: gm,
    })?;
    vm.wait_ready(T)?;
    let mut push = |n: &str, u: &str, v: f64| out.push((n.into(), u.into(), v));
    push(
        "boot to READY (ktest, 64 MiB)",
        "ms",
        t.elapsed().as_secs_f64() * 1e3,
    );
    check_mode(&vm, mode)?;
    let n = if mode == CpuMode::Native { 5000 } else { 200 };
    let ns: f64 = ask(&vm, &format!("bench-syscall {n}"))?.trim().parse()?;
    push("getpid round trip", "us", ns / 1e3);
    let ns: f64 = ask(&vm, &format!("bench-fault {}", n / 10))?
        .trim()
        .parse()?;
    push("anonymous page fault", "us", ns / 1e3);
    let k = 50;
    let t = Instant::now();
    for _ in 0..k {
        vm.request(kind::PING, b"", T)?;
    }
    push(
        "PING round trip (no process)",
        "us",
        t.elapsed().as_secs_f64() * 1e6 / k as f64,
    );
    let t = Instant::now();
    for _ in 0..k {
        ask(&vm, "echo x")?;
    }
    push(
        "echo round trip (user process)",
        "us",
        t.elapsed().as_secs_f64() * 1e6 / k as f64,
    );
    vm.stop()?;

    GuestMode::set_process_default(gm);
    let r = runner::run(Workload::Web, o.mem_bytes, o.web_requests, 4)?;
    push("web boot to READY", "ms", r.boot_ms);
    push("web: boot call -> first answer", "ms", r.first_response_ms);
    push("web throughput (window 4)", "req/s", r.run.throughput_rps);

    // A lazy clone of a warm web parent: call -> first checked answer.
    let b = runner::boot(Workload::Web, o.mem_bytes, &format!("modes-parent-{mode}"))?;
    let reqs = Workload::Web.requests(7, 20);
    runner::drive(&b.vm, Workload::Web, &reqs, 4, true)?;
    let t = Instant::now();
    let batch = b.vm.clone_children(1, &CloneOptions::default())?;
    let child = &batch.children[0];
    runner::drive(child, Workload::Web, &reqs[..1], 1, true)?;
    push(
        "lazy clone: call -> first answer",
        "ms",
        t.elapsed().as_secs_f64() * 1e3,
    );
    check_mode(child, mode)?;
    check_mode(&b.vm, mode)?;
    for c in batch.children {
        c.stop()?;
    }
    b.vm.stop()?;
    GuestMode::Auto.set_process_default();
    Ok(())
}

fn spread(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    [v[0], v[v.len() / 2], v[v.len() - 1]]
}

/// Measure both modes (emulated first, the baseline).
pub fn run(o: &ModesOptions) -> anyhow::Result<Vec<ModeFigures>> {
    let mut all = Vec::new();
    for mode in [CpuMode::Emulated, CpuMode::Native] {
        let mut samples = Vec::new();
        for _ in 0..o.reps.max(1) {
            one_rep(mode, o, &mut samples).with_context(|| format!("measuring the {mode} mode"))?;
        }
        let mut figures: Vec<(String, String, [f64; 3])> = Vec::new();
        for (name, unit, _) in samples.iter().take(samples.len() / o.reps.max(1)) {
            let v: Vec<f64> = samples
                .iter()
                .filter(|(n, _, _)| n == name)
                .map(|s| s.2)
                .collect();
            figures.push((name.clone(), unit.clone(), spread(v)));
        }
        all.push(ModeFigures { mode, figures });
    }
    Ok(all)
}

/// Print the table: emulated and native medians (min-max) and native's ratio to emulated.
pub fn print(figs: &[ModeFigures]) {
    let (Some(emu), Some(nat)) = (
        figs.iter().find(|f| f.mode == CpuMode::Emulated),
        figs.iter().find(|f| f.mode == CpuMode::Native),
    ) else {
        return;
    };
    println!(
        "{:<36} {:>6} {:>26} {:>26} {:>9}",
        "figure", "unit", "emulated median (min-max)", "native median (min-max)", "speed-up"
    );
    for ((name, unit, e), (_, _, n)) in emu.figures.iter().zip(&nat.figures) {
        let cell = |v: &[f64; 3]| format!("{:.1} ({:.1}-{:.1})", v[1], v[0], v[2]);
        let ratio = if unit == "req/s" {
            n[1] / e[1]
        } else {
            e[1] / n[1]
        };
        println!(
            "{name:<36} {unit:>6} {:>26} {:>26} {:>8.1}x",
            cell(e),
            cell(n),
            ratio
        );
    }
}
