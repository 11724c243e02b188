//! `/bin/matmul`: the matmul workload as a kscope guest program (see `kscope_workloads::handlers`).
#![no_std]
#![no_main]

extern crate alloc;

use kscope_workloads::guest::{serve, GuestFiles};
use kscope_workloads::handlers::TextHandler;
use kscope_workloads::Workload;

fn main() -> i32 {
    let mut handler = TextHandler::new(Workload::Matmul, GuestFiles::default());
    serve("matmul", &mut handler)
}

kscope_guest::user_main!(main);
