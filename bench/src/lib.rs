//! kscope's measurement engine: boot a workload VM, drive it with checked requests and
//! summarise latencies ([`runner`]; the summaries are `kscope_vmm::summary`); the benchmarks
//! behind `kscope bench ...`, each printing ratios against baselines measured in the same run:
//! [`warmup`] (clone warm-up per prefetch policy, plotted by [`plot`]) and [`dedup`]
//! (color-targeted deduplication). Policies are built through `kscope_policies::factory`, as
//! the clone service does. Only the CLI depends on this crate.

pub mod clone;
pub mod dedup;
pub mod linux;
pub mod modes;
pub mod net;
pub mod plot;
pub mod runner;
pub mod warmup;
