//! Memory management: the frame allocator with its ground-truth table, page tables and the
//! small-object slab.

pub mod frame;
pub mod paging;
pub mod slab;

use kscope_guest::abi::layout::{phys_to_virt, PAGE_SIZE};

/// Round `v` down to a page boundary.
pub const fn page_down(v: u64) -> u64 {
    v & !(PAGE_SIZE - 1)
}

/// Round `v` up to a page boundary.
pub const fn page_up(v: u64) -> u64 {
    (v + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// Direct-map address of a physical address.
pub const fn va(phys: u64) -> u64 {
    phys_to_virt(phys)
}
