//! kscope: the clone service (`kscope serve`, [`server`]), its elastic load balancer
//! (`kscope lb`, [`lb`]) and the command line ([`cli`]). The service and the load balancer
//! build on the VMM and the policies only; the CLI alone also uses the measurement engine
//! (`kscope-bench`).

pub mod cli;
pub mod lb;
pub mod server;
