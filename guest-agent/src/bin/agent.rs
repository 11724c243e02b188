//! `/bin/agent`: the kscope guest agent (ring 3). Registers for SIGCLONE, then sleeps in
//! `recv_request` (the kernel never hands workload requests to the agent; a SIGCLONE restarts
//! the call after the handler runs).
#![no_std]
#![no_main]

use kscope_guest::abi::syscall::CloneInfo;
use kscope_guest::println;
use kscope_guest::ulib::{self, sys};
use kscope_guest_agent::{clone_identity, reseed_material};

fn on_clone(info: &CloneInfo) {
    let mut fresh = [0u8; 32];
    let _ = sys::getrandom(&mut fresh);
    let material = reseed_material(info, sys::clock_ns(), &fresh);
    let reseeded = sys::reseed(&material).is_ok();
    let id = clone_identity(info);
    let identity_set = sys::set_identity(&id).is_ok();
    let dropped = sys::drop_inflight().unwrap_or(0);
    let ip = id.ipv4;
    let m = id.mac;
    let host_len = id.hostname.iter().position(|&b| b == 0).unwrap_or(32);
    let host = core::str::from_utf8(&id.hostname[..host_len]).unwrap_or("?");
    println!(
        "agent: clone {} generation {}: host {} ip {}.{}.{}.{}/{} mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} reseeded={} identity={} dropped={}",
        info.clone_id, info.generation, host, ip[0], ip[1], ip[2], ip[3], id.prefix_len,
        m[0], m[1], m[2], m[3], m[4], m[5], reseeded, identity_set, dropped
    );
}

fn main() -> i32 {
    if let Err(e) = ulib::on_clone(on_clone) {
        println!("agent: cannot register for SIGCLONE: errno {}", e.0);
        return 1;
    }
    let mut buf = [0u8; 16];
    loop {
        // Blocks forever: agents never receive workload requests.
        let _ = sys::recv_request(&mut buf);
    }
}

kscope_guest::user_main!(main);
