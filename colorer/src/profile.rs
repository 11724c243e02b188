//! What the colorer needs to know about a guest OS, behind a small trait so that profiles for
//! other guests (e.g. Linux through vmcoreinfo) can be added beside [`crate::KscopeProfile`].
//!
//! A profile only *locates* structures; the colorer decides colors. No profile method exposes
//! a guest's ground-truth table: only [`crate::accuracy`] reads it.

use crate::mem::{FrameSet, Gfn, MemError};
use crate::pagewalk::WalkError;
use serde::Serialize;
use std::ops::Range;

/// Errors of profiles.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// A guest-physical read failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A page-table walk failed.
    #[error(transparent)]
    Walk(#[from] WalkError),
    /// The guest does not describe itself the way this profile expects.
    #[error("no {what} found: {hint}")]
    NotFound {
        /// What is missing.
        what: &'static str,
        /// What to do about it.
        hint: &'static str,
    },
    /// The guest's descriptor has another layout version.
    #[error(
        "guest descriptor version {found}, this colorer reads version {expected}: rebuild the \
         colorer and the guest kernel from the same kscope-guest ABI"
    )]
    Version {
        /// Version in guest memory.
        found: u32,
        /// Version this build understands.
        expected: u32,
    },
    /// A field of the descriptor is impossible.
    #[error("guest descriptor field {field} = {value:#x} is invalid ({why}); the guest memory is corrupt or not from a kscope guest")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is rejected.
        why: &'static str,
    },
    /// A kernel virtual address does not translate to guest RAM.
    #[error("kernel virtual address {va:#x} ({what}) is not mapped to guest RAM; the structure is corrupt")]
    Unmapped {
        /// The address.
        va: u64,
        /// What was being read.
        what: &'static str,
    },
}

/// A process and its page-table root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessRoot {
    /// Process id.
    pub pid: u32,
    /// Guest-physical address of its PML4 (its CR3).
    pub cr3: u64,
    /// Program name, if known.
    pub name: String,
}

/// Section of a kernel image range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Section {
    /// Executable code.
    Text,
    /// Read-only data.
    Rodata,
    /// Data and bss.
    Data,
}

/// Frames of one kernel image section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRange {
    /// The section.
    pub section: Section,
    /// Frames it occupies.
    pub gfns: Range<Gfn>,
}

/// Kind of a cached file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// An executable.
    Exec,
    /// A data file.
    Data,
}

/// A file with a page cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileInfo {
    /// Inode number.
    pub ino: u32,
    /// Executable or data.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Path, if known.
    pub name: String,
    /// Profile-specific handle of the cache (for kscope: the radix root's virtual address).
    pub cache_root: u64,
    /// Number of cached pages the guest claims (a hint, not trusted).
    pub nr_cached: u64,
}

/// Counters of what a profile tolerated while reading the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProfileAnomalies {
    /// Process entries skipped (bad CR3, bad state).
    pub bad_processes: u64,
    /// File entries skipped (bad kind).
    pub bad_files: u64,
    /// Radix nodes rejected (unmapped, bad shift, revisited).
    pub bad_radix_nodes: u64,
    /// Radix leaf slots rejected (not a page-aligned address of guest RAM).
    pub bad_radix_slots: u64,
    /// Radix nodes whose `count` or `parent` disagreed with what was read.
    pub radix_inconsistencies: u64,
}

/// Roles that the guest's own frame descriptors state for some frames (e.g. Linux's
/// `struct page` flags), evidence beside the walks. Each set covers the guest's frames.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameRoles {
    /// Frames the kernel keeps for itself (slab, reserved): `KernelData` unless reached as a
    /// page table or mapped as code/user memory.
    pub kernel: FrameSet,
    /// Anonymous user memory, mapped or not: `UserData` unless mapped executable.
    pub anon: FrameSet,
    /// Page-table pages the kernel marks as such (also when no walk reaches them).
    pub page_table: FrameSet,
}

/// The guest-structure readers the colorer uses.
pub trait GuestProfile {
    /// Short name of the profile (for statistics).
    fn name(&self) -> &str;

    /// Roots of kernel address spaces (guest-physical PML4 addresses), walked completely.
    fn kernel_roots(&self) -> Result<Vec<u64>, ProfileError>;

    /// Live processes and their roots.
    fn processes(&self) -> Result<Vec<ProcessRoot>, ProfileError>;

    /// Frames of the kernel image by section, if the guest says where its image is.
    fn kernel_image(&self) -> Result<Vec<ImageRange>, ProfileError>;

    /// Virtual ranges whose mappings say nothing about a page's role (the direct map, other
    /// whole-RAM windows): leaves there are ignored (their tables are still colored).
    fn ignored_ranges(&self) -> Result<Vec<Range<u64>>, ProfileError>;

    /// Files that have a page cache.
    fn files(&self) -> Result<Vec<FileInfo>, ProfileError>;

    /// The cached pages of `file` as `(page index, frame)` in file order (ascending index).
    /// Corrupt parts of the cache are skipped and counted in [`GuestProfile::anomalies`].
    fn file_pages(&self, file: &FileInfo) -> Result<Vec<(u64, Gfn)>, ProfileError>;

    /// Frames the guest's allocator has handed out (set = in use), if known.
    fn frames_in_use(&self) -> Result<Option<FrameSet>, ProfileError>;

    /// Per-frame roles from the guest's frame descriptors, if the profile reads them.
    fn frame_roles(&self) -> Result<Option<FrameRoles>, ProfileError> {
        Ok(None)
    }

    /// Anomalies seen so far.
    fn anomalies(&self) -> ProfileAnomalies {
        ProfileAnomalies::default()
    }
}

/// A guest-agnostic profile that knows only page-table roots (e.g. vCPU CR3s): page tables,
/// user/kernel code/data and zero pages are colored, nothing else.
#[derive(Clone, Debug, Default)]
pub struct RootsOnlyProfile {
    /// Roots walked as kernel roots.
    pub roots: Vec<u64>,
    /// Virtual ranges to ignore (e.g. a known direct map).
    pub ignored: Vec<Range<u64>>,
}

impl GuestProfile for RootsOnlyProfile {
    fn name(&self) -> &str {
        "roots-only"
    }

    fn kernel_roots(&self) -> Result<Vec<u64>, ProfileError> {
        Ok(self.roots.clone())
    }

    fn processes(&self) -> Result<Vec<ProcessRoot>, ProfileError> {
        Ok(Vec::new())
    }

    fn kernel_image(&self) -> Result<Vec<ImageRange>, ProfileError> {
        Ok(Vec::new())
    }

    fn ignored_ranges(&self) -> Result<Vec<Range<u64>>, ProfileError> {
        Ok(self.ignored.clone())
    }

    fn files(&self) -> Result<Vec<FileInfo>, ProfileError> {
        Ok(Vec::new())
    }

    fn file_pages(&self, _file: &FileInfo) -> Result<Vec<(u64, Gfn)>, ProfileError> {
        Ok(Vec::new())
    }

    fn frames_in_use(&self) -> Result<Option<FrameSet>, ProfileError> {
        Ok(None)
    }
}
