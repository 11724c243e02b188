//! kscope: the clone service (`kscope serve`), its elastic load balancer (`kscope lb`) and
//! the summaries printed by the CLI and benchmarks.

pub mod cli;
pub mod lb;
pub mod runner;
pub mod server;
pub mod stats;
