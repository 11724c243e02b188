//! kscope: the clone service (`kscope serve`), its elastic load balancer (`kscope lb`) and
//! the summaries printed by the CLI and benchmarks.

pub mod cli;
pub mod lb;
pub mod server;

pub use kscope_bench::{runner, stats};
pub mod experiment;
