//! `/bin/web`: the web workload as a kscope guest program (see `kscope_workloads::handlers`).
#![no_std]
#![no_main]

extern crate alloc;

use kscope_workloads::guest::{serve, GuestFiles};
use kscope_workloads::handlers::WebHandler;
use kscope_workloads::web::Web;

fn main() -> i32 {
    let mut handler = WebHandler(Web::new(GuestFiles::default()));
    serve("web", &mut handler)
}

kscope_guest::user_main!(main);
