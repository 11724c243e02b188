//! Function-style workloads (FaaSnap's table): small programs whose working set follows the
//! input size.

pub mod aes;
pub mod compress;
pub mod json;
pub mod matmul;
