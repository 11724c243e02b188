//! The hook through which a prefetch policy drives a clone's fault serving.
//!
//! The VMM stays guest-agnostic: it only knows guest frame numbers. Policies (crate
//! `kscope-policies`) know colors and file order and decide, per clone, what to install on each
//! fault, what to zero-fill instead of fetching (allocation on demand), what to load before the
//! clone resumes (REAP-style) and what a background fetcher loads concurrently (FaaSnap-style).

/// A guest frame number (guest-physical address / 4096).
pub type Gfn = u64;

/// A fault that a clone's vCPU (or the VMM on its behalf) took on a missing page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting frame.
    pub gfn: Gfn,
    /// True if the access was a write.
    pub write: bool,
}

/// Per-clone prefetch decisions. One instance serves one clone; the fault server calls it
/// from its handler thread only (never concurrently), so implementations may keep state.
pub trait Prefetcher: Send {
    /// Name of the policy (for statistics).
    fn name(&self) -> &str;

    /// On a fault, push into `out` the frames to install *now* besides `fault.gfn` (which is
    /// always installed), in priority order. The server skips frames already present, so
    /// policies need not track what is resident.
    fn on_fault(&mut self, fault: Fault, out: &mut Vec<Gfn>);

    /// True if `gfn` must be served as a zero page instead of being fetched (free pages,
    /// zero pages: allocation on demand). Default: fetch everything.
    fn zero_fill(&self, gfn: Gfn) -> bool {
        let _ = gfn;
        false
    }

    /// Frames to install before the clone's vCPUs first run (blocking the resume), in order.
    fn before_resume(&mut self) -> Vec<Gfn> {
        Vec::new()
    }

    /// Frames for a background fetcher to install while the clone runs, in order.
    fn background(&mut self) -> Vec<Gfn> {
        Vec::new()
    }
}

/// The `lazy` policy: one page per fault, nothing else (SnowFlock's lazy propagation).
#[derive(Debug, Default, Clone, Copy)]
pub struct OnDemand;

impl Prefetcher for OnDemand {
    fn name(&self) -> &str {
        "lazy"
    }

    fn on_fault(&mut self, _fault: Fault, _out: &mut Vec<Gfn>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_demand_fetches_only_the_faulting_page() {
        let mut p = OnDemand;
        let mut out = vec![];
        p.on_fault(
            Fault {
                gfn: 7,
                write: false,
            },
            &mut out,
        );
        assert!(out.is_empty());
        assert!(!p.zero_fill(7));
        assert!(p.before_resume().is_empty());
        assert!(p.background().is_empty());
        assert_eq!(p.name(), "lazy");
    }
}
