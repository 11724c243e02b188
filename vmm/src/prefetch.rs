//! The hook through which a prefetch policy drives a clone's fault serving.
//!
//! The VMM stays guest-agnostic: it only knows guest frame numbers. Policies (crate
//! `kscope-policies`) know colors and file order and decide, per clone, what to install on each
//! fault and how (with the image's data, or as a zero page: allocation on demand), what to
//! load before the clone resumes (REAP-style) and what a background fetcher loads concurrently
//! (FaaSnap-style).

pub use crate::hostmem::Gfn;

/// A fault that a clone's vCPU (or the VMM on its behalf) took on a missing page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting frame.
    pub gfn: Gfn,
    /// True if the access was a write.
    pub write: bool,
}

/// How a frame is installed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Fill {
    /// With the generation image's contents.
    #[default]
    Data,
    /// As a zero page, without reading the image (free or zero frames).
    Zero,
}

/// One frame to install and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Install {
    /// The frame.
    pub gfn: Gfn,
    /// Data or zeros.
    pub fill: Fill,
}

impl Install {
    /// Install `gfn` with data.
    pub const fn data(gfn: Gfn) -> Self {
        Install {
            gfn,
            fill: Fill::Data,
        }
    }

    /// Install `gfn` as a zero page.
    pub const fn zero(gfn: Gfn) -> Self {
        Install {
            gfn,
            fill: Fill::Zero,
        }
    }
}

/// What a policy decided for one fault: how to install the faulting frame, and which other
/// frames to install after it, in priority order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// How the faulting frame is installed (default: data).
    pub fault: Fill,
    /// Frames to install after the faulting one (the server skips frames already present, so
    /// policies need not track what is resident).
    pub prefetch: Vec<Install>,
}

impl FaultPlan {
    /// Reset for the next fault (keeps the allocation).
    pub fn clear(&mut self) {
        self.fault = Fill::Data;
        self.prefetch.clear();
    }
}

/// Per-clone prefetch decisions. One instance serves one clone.
///
/// The fault server asks for [`before_resume`](Self::before_resume) and
/// [`background`](Self::background) once, when it starts, and then moves the policy into its
/// handler thread, which alone calls [`on_fault`](Self::on_fault): once per fault, never
/// concurrently and without a lock, so implementations may keep state. The background fetcher
/// and the VMM's own installs never touch the policy.
pub trait Prefetcher: Send {
    /// Name of the policy (for statistics).
    fn name(&self) -> &str;

    /// On a fault, fill `plan` (cleared by the caller): how to install `fault.gfn` and what to
    /// install after it.
    fn on_fault(&mut self, fault: Fault, plan: &mut FaultPlan);

    /// Frames to install before the clone's vCPUs first run (blocking the resume), in order.
    fn before_resume(&mut self) -> Vec<Install> {
        Vec::new()
    }

    /// Frames for a background fetcher to install while the clone runs, in order.
    fn background(&mut self) -> Vec<Install> {
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

    fn on_fault(&mut self, _fault: Fault, _plan: &mut FaultPlan) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_demand_fetches_only_the_faulting_page() {
        let mut p = OnDemand;
        let mut plan = FaultPlan::default();
        p.on_fault(
            Fault {
                gfn: 7,
                write: false,
            },
            &mut plan,
        );
        assert_eq!(plan, FaultPlan::default());
        assert_eq!(plan.fault, Fill::Data);
        assert!(p.before_resume().is_empty());
        assert!(p.background().is_empty());
        assert_eq!(p.name(), "lazy");
    }
}
