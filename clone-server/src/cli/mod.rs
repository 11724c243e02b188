//! The `kscope` subcommands: argument types and entry points (printing lives here; the
//! engines live in [`kscope_bench::runner`], the VMM and the other crates).

mod bench;
mod bench_net;
mod clone;
mod color;
mod demo;
mod experiment;
mod run;
mod service;
mod snapshot;

pub use bench::{bench, BenchCmd};
pub use clone::{
    clone, clone_workload, print_report as print_clone_report, CloneArgs, CloneReport,
};
pub use color::{color, color_image, color_workload, ColorArgs, ProfileArg};
pub use demo::{demo, DemoArgs};
pub use experiment::{experiment, ExperimentCmd};
pub use run::{run, RunArgs};
pub use service::{lb, serve, LbArgs, ServeArgs};
pub use snapshot::{snapshot, SnapshotCmd};

use kscope_vmm::summary::parse_size;

/// Parse a `--mem` value (`64M`, `256M`, `1G`).
/// The `--memory` argument: a [`kscope_vmm::MemoryMode`] by its API name.
pub(crate) fn memory_mode_arg(
) -> impl clap::builder::TypedValueParser<Value = kscope_vmm::MemoryMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(kscope_vmm::MemoryMode::ALL.map(|m| m.as_str())).map(
        |s| {
            s.parse::<kscope_vmm::MemoryMode>()
                .expect("a possible value")
        },
    )
}

pub(crate) fn mem_arg(s: &str) -> Result<u64, String> {
    let b = parse_size(s)?;
    if b < 16 << 20 || b % (2 << 20) != 0 {
        return Err(format!(
            "memory size {s:?} must be a multiple of 2 MiB and at least 16 MiB"
        ));
    }
    Ok(b)
}
