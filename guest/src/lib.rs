//! kscope's guest operating system.
//!
//! - [`abi`]: the contract with the VMM, user programs and outside readers;
//! - `src/kernel/`: the kernel binary (`#![no_std]`, CPL0, no SSE), built by `build.rs` with a
//!   nested cargo invocation and embedded here as [`KERNEL_ELF`];
//! - [`ulib`] (feature `user`): the user-mode runtime for guest programs;
//! - [`mkfs`] (feature `host`): builds root file-system images on the host.
#![cfg_attr(not(test), no_std)]

#[cfg(any(feature = "host", feature = "user"))]
extern crate alloc;

pub mod abi;

/// Host-side builder of root file-system images.
#[cfg(feature = "host")]
pub mod mkfs;

#[cfg(feature = "user")]
pub mod ulib;

/// The guest kernel ELF, built by this crate's build script.
#[cfg(kscope_embed)]
pub static KERNEL_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kscope-kernel.elf"));

/// OS test programs of the kernel (ring 3, built with `ulib`): `(path in the guest file
/// system, ELF bytes)`, e.g. `("/bin/ktest", ..)`.
#[cfg(kscope_embed)]
pub static PROGRAMS: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/programs.rs"));
