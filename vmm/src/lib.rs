//! kscope VMM.

pub mod prefetch;
