//! Lazy guest memory for clones (SnowFlock-style lazy propagation over userfaultfd).
//!
//! - [`PageSource`]: where a clone's pages come from ([`MemfdImage`], [`LayeredImage`],
//!   [`FileImage`]), optionally checked page by page ([`VerifiedImage`]).
//! - [`LazyRegion`]: a clone's destination memory, a memfd mapped `MAP_SHARED` (so a clone can
//!   itself be frozen and cloned), registered with a userfaultfd in MISSING mode.
//! - [`FaultServer`]: one handler thread per clone serving faults, driven by the clone's
//!   [`Prefetcher`](crate::prefetch::Prefetcher); pre-resume and background installs.
//! - [`CloneStats`]/[`StatsSnapshot`]: per-clone counters, fault latency histogram, touched set.
//! - [`eager_fill`]: the eager alternative (copy every non-zero page before resume).

#[cfg(test)]
mod bench;
mod bitmap;
mod region;
mod server;
mod source;
mod stats;
#[cfg(test)]
pub(crate) mod tests;
mod verified;

pub use bitmap::{AtomicBitmap, Bitmap};
pub use region::{LazyRegion, RegionKind};
pub use server::{FailureHook, FaultServer, InstallReport, ServerOptions};
pub use source::{
    eager_fill, DeferredImage, EagerReport, FileImage, LayeredImage, MemfdImage, PageSource,
};
pub use stats::{CloneStats, LatencyHistogram, StatsSnapshot};
pub use verified::{page_crc, zero_page_crc, VerifiedImage};

pub use crate::hostmem::{Gfn, PAGE_SIZE};
use crate::uffd::UffdError;

/// Errors of lazy memory serving.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A system call on memory or files failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A frame beyond the end of a source or region was asked for.
    #[error("frame {gfn} is outside the {pages}-page {what}; size the source and region alike")]
    OutOfRange {
        /// The frame.
        gfn: Gfn,
        /// Pages of the object.
        pages: u64,
        /// Which object.
        what: &'static str,
    },
    /// A page does not match the checksum recorded for it (a damaged snapshot memory file);
    /// it is never installed.
    #[error("page {gfn} of {path} is corrupt: {what}")]
    Corrupt {
        /// The frame.
        gfn: Gfn,
        /// The image (a snapshot's memory file).
        path: String,
        /// The checksums.
        what: String,
    },
    /// Sizes of layers, sources or regions disagree.
    #[error("size mismatch: {0}")]
    Size(String),
    /// A handler or fetcher thread could not be started or panicked.
    #[error("thread {name}: {what}")]
    Thread {
        /// Thread name.
        name: String,
        /// What went wrong.
        what: String,
    },
}

/// Result type of the lazy module.
pub type Result<T> = std::result::Result<T, LazyError>;

/// Wraps an `io::Error` of `op` (for `map_err`).
pub(crate) fn io_at(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> LazyError {
    move |source| LazyError::Io {
        op: op.into(),
        source,
    }
}
