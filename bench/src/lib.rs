//! kscope's measurement engine: boot a workload VM, drive it with checked requests and
//! summarise latencies ([`runner`], [`stats`]); the benchmarks behind `kscope bench ...`, each
//! printing ratios against baselines measured in the same run: [`warmup`] (clone warm-up per
//! prefetch policy, plotted by [`plot`]) and [`dedup`] (color-targeted deduplication). [`policy`]
//! turns policy specs into the VMM's prefetcher factories (shared with the clone service).

pub mod dedup;
pub mod modes;
pub mod net;
pub mod plot;
pub mod policy;
pub mod runner;
pub mod stats;
pub mod warmup;
