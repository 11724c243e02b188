//! kscope's VM state coloring (Kaleidoscope): what each guest frame is, read from the outside.
//!
//! The colorer reads a paused guest's memory (any [`PhysMem`]): it walks the x86-64 page
//! tables ([`pagewalk`]) from the kernel's and every process's root, reads the page-cache radix
//! trees and the frame allocator's bitmap through a [`GuestProfile`] ([`KscopeProfile`] for
//! kscope's own kernel), scans content for zero pages, and gives every frame one [`Color`]
//! ([`color`] -> [`ColorMap`], computed once per memory generation). [`accuracy`] compares a
//! map with the guest's ground truth; nothing else reads that table.
//!
//! # Precedence
//!
//! A frame may carry several pieces of evidence; the first matching row wins:
//!
//! | # | evidence | color | why |
//! |---|----------|-------|-----|
//! | 1 | reached as a page-table frame (any level, any root), or marked so by the profile ([`FrameRoles::page_table`]) | `PageTable` | structural fact; the direct map also maps it, any other mapping is a self-map |
//! | 2 | in the kernel image's text (from the profile) | `KernelCode` | the kernel says so; beats a coarse executable mapping of its image |
//! | 3 | in the kernel image's rodata/data/bss | `KernelData` | same; a zero bss page keeps its role |
//! | 4 | mapped U=1, NX=0 in the lower half of a root | `UserCode` | the ground truth's rule: a page-cache page mapped executable is user code |
//! | 5 | in an executable's page cache | `PageCacheExec` | radix tree; also when mapped read-only (e.g. rodata of the ELF) |
//! | 6 | in a data file's page cache | `PageCacheData` | radix tree; a shared mapping of the cache stays cache |
//! | 7 | mapped U=1, NX=1 in the lower half, or anonymous per the profile ([`FrameRoles::anon`]) | `UserData` | anonymous memory |
//! | 8 | mapped in the kernel half outside ignored ranges, NX=0 | `KernelCode` | |
//! | 9 | same, NX=1, or owned by the kernel per the profile's frame descriptors ([`FrameRoles::kernel`]: Linux slab, reserved) | `KernelData` | |
//! | 10 | free in the allocator bitmap | `Free` | beats Zero: a free frame is never fetched whatever its content |
//! | 11 | all-zero content | `Zero` | unreferenced and zero: nothing to fetch |
//! | 12 | in use in the allocator bitmap | `KernelData` | kernel heap/slab: allocated but referenced only through the direct map |
//! | 13 | nothing | `Unknown` | e.g. a profile without allocator information |
//!
//! Ignored evidence: leaves in the profile's ignored ranges (the direct map maps all RAM and
//! says nothing about a role; kscope also ignores its image window outside the image and the
//! boot area below it; a large leaf straddling a range is clipped frame by frame) and
//! supervisor (U=0) leaves in the lower half (a boot identity map would otherwise be a second
//! direct map); the page-table frames of those ranges are still `PageTable`.
//!
//! **Zero pages.** Independently of the color, [`ColorMap::zero`] marks every frame whose
//! content is all zero (a guest-agnostic fact, also what FaaSnap-style baselines use). A mapped zero page keeps its role color (row 1-9): the role
//! keeps per-color windows and file order coherent and the accuracy measurable, while the zero
//! bit lets a policy serve the page with a zero-fill instead of a fetch, which is exact (the
//! map describes the same memory the clone is served from) and costs no transfer. Only frames
//! with no role evidence but zero content become `Zero`. Free frames are zero-filled too: this
//! assumes the guest never reads a frame it has not allocated and written, which holds for
//! kscope's kernel (allocation zeroes or fully overwrites frames).
//!
//! # Cost
//!
//! The walk reads each page-table frame once (shared kernel subtrees are skipped for later
//! roots); the zero scan reads every frame once (up to its first non-zero 64 bytes) and
//! dominates. See [`cost`] and the
//! `color_cost` example.

pub mod accuracy;
pub mod color;
pub mod cost;
pub mod kscope;
pub mod linux;
pub mod mem;
pub mod pagewalk;
pub mod profile;
pub mod radix;
pub mod synth;

pub use color::{
    color, Color, ColorError, ColorMap, ColorOptions, ColorStats, FilePages, ProcessStats, Timings,
};
pub use kscope::{Descriptor, KscopeProfile};
pub use linux::LinuxProfile;
pub use mem::{FrameSet, Gfn, MemError, PhysMem};
pub use profile::{
    FileInfo, FileKind, FrameRoles, GuestProfile, ProcessRoot, ProfileError, RootsOnlyProfile,
};

/// Color the kscope guest in `mem`; `vcpu_cr3` (if known) is walked as an extra root.
pub fn color_kscope<M: PhysMem + ?Sized>(
    mem: &M,
    vcpu_cr3: Option<u64>,
) -> Result<ColorMap, ColorError> {
    let profile = KscopeProfile::open(mem)?;
    let opts = ColorOptions {
        extra_roots: vcpu_cr3.into_iter().collect(),
        scan_zero: true,
    };
    color(mem, &profile, &opts)
}
