//! kscope: the clone service (`kscope serve`, [`server`]), its elastic load balancer
//! (`kscope lb`, [`lb`]), the micro-elastic cloud experiment (`kscope experiment`,
//! [`experiment`]) and the command line ([`cli`]). The service, the load balancer and the
//! experiment build on the VMM and the policies only; the CLI alone also uses the measurement
//! engine (`kscope-bench`).

pub mod cli;
pub mod experiment;
pub mod lb;
pub mod server;
