//! kscope's measurement engine: boot a workload VM, drive it with checked requests and
//! summarise latencies ([`runner`], [`stats`]); the benchmarks behind `kscope bench ...`, each
//! printing ratios against baselines measured in the same run.

pub mod runner;
pub mod stats;
