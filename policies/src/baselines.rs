//! Baseline policies: `upfront`, `blind`, `reap`, `faasnap`, `activeset` (`lazy` is
//! [`kscope_vmm::prefetch::OnDemand`]). None of them uses colors; `faasnap` uses only the
//! content-derived zero bit, as FaaSnap maps zero regions to anonymous memory.

use crate::{dedup_in_range, PolicyContext};
use kscope_vmm::prefetch::{Fault, FaultPlan, Fill, Gfn, Install, Prefetcher};
use std::sync::Arc;

/// `upfront`: every frame before the clone resumes (eager propagation as a policy of a lazy
/// clone; not to be confused with the `eager` memory mode, which copies without userfaultfd).
#[derive(Debug)]
pub struct Upfront {
    frames: u64,
}

impl Upfront {
    /// For a memory of `frames` frames.
    pub fn new(frames: u64) -> Self {
        Upfront { frames }
    }
}

impl Prefetcher for Upfront {
    fn name(&self) -> &str {
        "upfront"
    }

    fn on_fault(&mut self, _fault: Fault, _plan: &mut FaultPlan) {}

    fn before_resume(&mut self) -> Vec<Install> {
        (0..self.frames).map(Install::data).collect()
    }
}

/// `blind`: the next `window` frames by physical address on every fault, whatever they are.
#[derive(Debug)]
pub struct Blind {
    frames: u64,
    window: u64,
}

impl Blind {
    /// For a memory of `frames` frames.
    pub fn new(frames: u64, window: u64) -> Self {
        Blind { frames, window }
    }
}

impl Prefetcher for Blind {
    fn name(&self) -> &str {
        "blind"
    }

    fn on_fault(&mut self, fault: Fault, plan: &mut FaultPlan) {
        let start = fault.gfn.saturating_add(1);
        plan.prefetch
            .extend((start..start.saturating_add(self.window).min(self.frames)).map(Install::data));
    }
}

/// `reap`: the recorded working set before resume, the rest on demand.
#[derive(Debug)]
pub struct Reap {
    set: Vec<Gfn>,
}

impl Reap {
    /// From a recording (frames one clone touched, in order; duplicates and frames beyond
    /// memory are dropped).
    pub fn new(frames: u64, recording: &[Gfn]) -> Self {
        Reap {
            set: dedup_in_range(frames, recording.iter().copied()),
        }
    }
}

impl Prefetcher for Reap {
    fn name(&self) -> &str {
        "reap"
    }

    fn on_fault(&mut self, _fault: Fault, _plan: &mut FaultPlan) {}

    fn before_resume(&mut self) -> Vec<Install> {
        self.set.iter().copied().map(Install::data).collect()
    }
}

/// `faasnap`: the loading set (recorded accesses, each followed by `readahead` frames) by the
/// background fetcher in recorded order, never blocking the resume; all-zero frames are
/// zero-filled and left out of the loading set.
#[derive(Debug)]
pub struct FaaSnap {
    ctx: Arc<PolicyContext>,
    loading: Vec<Gfn>,
}

impl FaaSnap {
    /// From a recording and the readahead that made the "present pages".
    pub fn new(ctx: Arc<PolicyContext>, recording: &[Gfn], readahead: u64) -> Self {
        let frames = ctx.frames();
        let all = recording
            .iter()
            .flat_map(|&g| (0..=readahead).map(move |k| g.saturating_add(k)));
        let loading = dedup_in_range(frames, all)
            .into_iter()
            .filter(|&g| !ctx.is_zero(g))
            .collect();
        FaaSnap { ctx, loading }
    }
}

impl Prefetcher for FaaSnap {
    fn name(&self) -> &str {
        "faasnap"
    }

    fn on_fault(&mut self, fault: Fault, plan: &mut FaultPlan) {
        if self.ctx.is_zero(fault.gfn) {
            plan.fault = Fill::Zero;
        }
    }

    fn background(&mut self) -> Vec<Install> {
        self.loading.iter().copied().map(Install::data).collect()
    }
}

/// `activeset` (Picocenter): the aligned blocks of `block` frames holding recorded pages
/// before resume, in recorded order; on a fault, the rest of the faulting page's block.
#[derive(Debug)]
pub struct ActiveSet {
    frames: u64,
    block: u64,
    set: Vec<Gfn>,
}

impl ActiveSet {
    /// From a recording.
    pub fn new(frames: u64, recording: &[Gfn], block: u64) -> Self {
        let block = block.max(1);
        let all = recording.iter().filter(|&&g| g < frames).flat_map(|&g| {
            let b = g / block * block;
            b..b.saturating_add(block)
        });
        ActiveSet {
            frames,
            block,
            set: dedup_in_range(frames, all),
        }
    }
}

impl Prefetcher for ActiveSet {
    fn name(&self) -> &str {
        "activeset"
    }

    fn on_fault(&mut self, fault: Fault, plan: &mut FaultPlan) {
        if fault.gfn >= self.frames {
            return;
        }
        let b = fault.gfn / self.block * self.block;
        plan.prefetch.extend(
            (b..b.saturating_add(self.block).min(self.frames))
                .filter(|&g| g != fault.gfn)
                .map(Install::data),
        );
    }

    fn before_resume(&mut self) -> Vec<Install> {
        self.set.iter().copied().map(Install::data).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fault, gfns, zero_fill};
    use crate::{build, testmap, PolicyConfig};

    #[test]
    fn lazy_and_upfront() {
        let map = testmap::map();
        let mut p = build("lazy", &map, None, &PolicyConfig::default()).unwrap();
        assert_eq!(fault(p.as_mut(), 13), Vec::<Gfn>::new());
        assert!(p.before_resume().is_empty() && p.background().is_empty());
        assert!(!zero_fill(p.as_mut(), 9));
        let mut p = build("upfront", &map, None, &PolicyConfig::default()).unwrap();
        assert_eq!(gfns(p.before_resume()), (0..48).collect::<Vec<_>>());
        assert_eq!(fault(p.as_mut(), 13), Vec::<Gfn>::new());
        assert!(!zero_fill(p.as_mut(), 9));
    }

    #[test]
    fn blind_ignores_color() {
        let map = testmap::map();
        let mut p = build("blind", &map, None, &PolicyConfig::default()).unwrap();
        assert_eq!(fault(p.as_mut(), 13), (14..=21).collect::<Vec<_>>());
        assert_eq!(fault(p.as_mut(), 44), vec![45, 46, 47]);
        assert_eq!(fault(p.as_mut(), 47), Vec::<Gfn>::new());
        assert!(!zero_fill(p.as_mut(), 9) && !zero_fill(p.as_mut(), 23));
        let mut p = build(
            "blind",
            &map,
            None,
            &PolicyConfig::parse("blind_window=2").unwrap(),
        )
        .unwrap();
        assert_eq!(fault(p.as_mut(), 4), vec![5, 6]);
    }

    #[test]
    fn reap_replays_the_working_set() {
        let map = testmap::map();
        let rec = [13, 4, 13, 60, 2];
        let mut p = build("reap", &map, Some(&rec), &PolicyConfig::default()).unwrap();
        assert_eq!(gfns(p.before_resume()), vec![13, 4, 2]);
        assert_eq!(fault(p.as_mut(), 30), Vec::<Gfn>::new());
        assert!(p.background().is_empty() && !zero_fill(p.as_mut(), 23));
    }

    #[test]
    fn faasnap_loads_present_pages_in_the_background() {
        let map = testmap::map();
        let cfg = PolicyConfig::parse("faasnap_readahead=2").unwrap();
        let rec = [13, 4, 46, 5, 6];
        let mut p = build("faasnap", &map, Some(&rec), &cfg).unwrap();
        // 13 14 15 | 4 5 6 | 46 47 | 5 6 7(zero) | 6 7 8.
        assert_eq!(gfns(p.background()), vec![13, 14, 15, 4, 5, 6, 46, 47, 8]);
        assert!(p.before_resume().is_empty());
        assert_eq!(fault(p.as_mut(), 30), Vec::<Gfn>::new());
        // Zero by content only: 9 is free and zero, 17 is free with stale content.
        for g in [7, 9, 23, 26] {
            assert!(zero_fill(p.as_mut(), g), "{g}");
        }
        assert!(!zero_fill(p.as_mut(), 17) && !zero_fill(p.as_mut(), 4));
    }

    #[test]
    fn activeset_fetches_blocks() {
        let map = testmap::map();
        let cfg = PolicyConfig::parse("activeset_block=8").unwrap();
        let mut p = build("activeset", &map, Some(&[13, 4, 42, 99]), &cfg).unwrap();
        let mut want: Vec<Gfn> = (8..16).collect();
        want.extend(0..8);
        want.extend(40..48);
        assert_eq!(gfns(p.before_resume()), want);
        assert_eq!(fault(p.as_mut(), 20), vec![16, 17, 18, 19, 21, 22, 23]);
        assert_eq!(fault(p.as_mut(), 100), Vec::<Gfn>::new());
        // Default block of 32 over 48 frames.
        let mut p = build("activeset", &map, Some(&[40, 3]), &PolicyConfig::default()).unwrap();
        let mut want: Vec<Gfn> = (32..48).collect();
        want.extend(0..32);
        assert_eq!(gfns(p.before_resume()), want);
    }
}
