//! kscope's guest operating system.
//!
//! - [`abi`]: the contract with the VMM, user programs and outside readers;
//! - `src/kernel/`: the kernel binary (`#![no_std]`, CPL0, no SSE), built by `build.rs` with a
//!   nested cargo invocation and embedded here as [`KERNEL_ELF`];
//! - [`ulib`] (feature `user`): the user-mode runtime for guest programs.
#![no_std]

pub mod abi;

#[cfg(feature = "user")]
pub mod ulib;

/// The guest kernel ELF, built by this crate's build script.
#[cfg(kscope_embed)]
pub static KERNEL_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kscope-kernel.elf"));
