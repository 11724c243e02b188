//! `kscope demo`: the README's quick start.

use clap::Args;
use kscope_workloads::Workload;

use kscope_bench::runner;
use kscope_vmm::summary::fmt_us;

/// Arguments of `kscope demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest memory of each VM.
    #[arg(long, default_value = "128M", value_parser = super::mem_arg)]
    pub mem: u64,
    /// Requests per workload.
    #[arg(long, short = 'n', default_value_t = 50)]
    pub requests: usize,
    /// Clones of the warm parent.
    #[arg(long, default_value_t = 4)]
    pub clones: usize,
}

/// Run the demo.
pub fn demo(a: DemoArgs) -> anyhow::Result<()> {
    println!(
        "kscope demo: booting each workload in its own VM ({} MiB) on kscope's guest kernel,",
        a.mem >> 20
    );
    println!(
        "driving it with {} requests checked against answers computed on the host.\n",
        a.requests
    );
    println!(
        "{:<10} {:>10} {:>15} {:>10} {:>10} {:>10}",
        "workload", "boot", "1st response", "req/s", "p50", "p99"
    );
    let mut modes = Vec::new();
    for w in Workload::ALL {
        let r = runner::run(w, a.mem, a.requests, 4)?;
        modes.push(r.cpu_mode);
        println!(
            "{:<10} {:>10} {:>15} {:>10.0} {:>10} {:>10}",
            r.workload,
            fmt_us(r.boot_ms * 1e3),
            fmt_us(r.first_response_ms * 1e3),
            r.run.throughput_rps,
            fmt_us(r.run.latency.p50_us),
            fmt_us(r.run.latency.p99_us)
        );
    }
    let mode = |m: &Option<kscope_vmm::CpuMode>| m.map_or("unreported", |m| m.as_str());
    println!(
        "\nThe guest kernel ran {} (asked for: {}; `--guest-mode` chooses).",
        modes
            .iter()
            .map(mode)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(" and "),
        kscope_vmm::GuestMode::process_default()
    );
    let intros = [
        (
            kscope_vmm::MemoryMode::Lazy,
            format!(
                "Cloning: a warm web parent is cloned {} times with lazy memory (pages fetched on \
                 first touch through userfaultfd), each clone into a VM created ahead of the call \
                 (as `kscope serve --pool` keeps them); each clone answers its own requests, \
                 checked.",
                a.clones
            ),
        ),
        (
            kscope_vmm::MemoryMode::Eager,
            "The same with eager memory (everything copied before the clones run: the baseline)."
                .to_string(),
        ),
    ];
    for (memory, intro) in intros {
        println!("\n{intro}\n");
        let r = super::clone_workload(
            Workload::Web,
            a.mem,
            a.clones,
            memory,
            a.requests,
            a.requests,
            a.clones,
        )?;
        super::print_clone_report(&r);
    }
    Ok(())
}
