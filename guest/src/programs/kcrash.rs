//! `/bin/kcrash`: dereferences a null pointer; the kernel must kill it and go on.
#![no_std]
#![no_main]

use kscope_guest::println;

fn main() -> i32 {
    println!("kcrash: dereferencing null");
    let p = core::hint::black_box(0usize) as *const u64;
    // SAFETY: deliberately invalid: this program exists to fault.
    let v = unsafe { p.read_volatile() };
    println!("kcrash: survived?! {v}");
    0
}

kscope_guest::user_main!(main);
