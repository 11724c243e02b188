//! Replay an access trace against a policy, modeling what the fault server does with its
//! decisions, to compare policies without running clones: blocking faults, frames transferred,
//! wasted prefetches and footprint (allocation on demand).
//!
//! Model: `before_resume` frames are installed first; then for each access, a frame not yet
//! resident is a fault (installed as the policy's `on_fault` plan says, with its prefetch
//! frames), and the background fetcher installs `background_per_access` frames of its queue.
//! A frame is zero-filled (no transfer) if the policy's plan says so, else transferred from the
//! parent.

use crate::{Fault, FaultPlan, Fill, Gfn, Install, Prefetcher};
use kscope_colorer::FrameSet;

/// Outcome of a replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Accesses replayed.
    pub accesses: u64,
    /// Accesses to a frame that was not resident (the vCPU blocks).
    pub faults: u64,
    /// Frames installed before resume.
    pub before_resume: u64,
    /// Frames installed by fault windows (besides the faulting frames).
    pub prefetched: u64,
    /// Frames installed by the background fetcher.
    pub background: u64,
    /// Frames transferred from the parent.
    pub transferred: u64,
    /// Frames served as zero pages.
    pub zero_filled: u64,
    /// Transferred frames that the trace accessed.
    pub useful: u64,
    /// Transferred frames that the trace never accessed.
    pub wasted: u64,
    /// Resident frames at the end (the clone's footprint).
    pub footprint: u64,
}

struct State<'a> {
    p: &'a mut dyn Prefetcher,
    resident: FrameSet,
    transferred: FrameSet,
    s: SimStats,
}

impl State<'_> {
    fn install(&mut self, Install { gfn: g, fill }: Install) -> bool {
        if g >= self.resident.frames() || self.resident.contains(g) {
            return false;
        }
        self.resident.insert(g);
        if fill == Fill::Zero {
            self.s.zero_filled += 1;
        } else {
            self.transferred.insert(g);
            self.s.transferred += 1;
        }
        true
    }
}

/// Replay `trace` (frames accessed, in order) against `p` over a memory of `frames` frames.
pub fn simulate(
    p: &mut dyn Prefetcher,
    frames: u64,
    trace: &[Gfn],
    background_per_access: usize,
) -> SimStats {
    simulate_with(p, frames, trace, background_per_access, &mut |_| {})
}

/// [`simulate`], calling `on_fault` with every frame that faults (in order).
pub fn simulate_with(
    p: &mut dyn Prefetcher,
    frames: u64,
    trace: &[Gfn],
    background_per_access: usize,
    on_fault: &mut dyn FnMut(Gfn),
) -> SimStats {
    let before = p.before_resume();
    let queue = p.background();
    let mut st = State {
        p,
        resident: FrameSet::new(frames),
        transferred: FrameSet::new(frames),
        s: SimStats::default(),
    };
    for g in before {
        if st.install(g) {
            st.s.before_resume += 1;
        }
    }
    let mut bg = queue.into_iter();
    let mut accessed = FrameSet::new(frames);
    let mut plan = FaultPlan::default();
    for &g in trace {
        st.s.accesses += 1;
        accessed.insert(g);
        if g < frames && !st.resident.contains(g) {
            st.s.faults += 1;
            on_fault(g);
            plan.clear();
            st.p.on_fault(
                Fault {
                    gfn: g,
                    write: false,
                },
                &mut plan,
            );
            st.install(Install {
                gfn: g,
                fill: plan.fault,
            });
            for &x in &plan.prefetch {
                if st.install(x) {
                    st.s.prefetched += 1;
                }
            }
        }
        for x in bg.by_ref().take(background_per_access) {
            if st.install(x) {
                st.s.background += 1;
            }
        }
    }
    st.s.useful = st
        .transferred
        .iter()
        .filter(|&g| accessed.contains(g))
        .count() as u64;
    st.s.wasted = st.s.transferred - st.s.useful;
    st.s.footprint = st.resident.len();
    st.s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{build, testmap, PolicyConfig};

    #[test]
    fn replay_counts_faults_transfers_and_waste() {
        let map = testmap::map();
        let cfg = PolicyConfig::default();
        // A scan of the data file in file order, then user data 4, 5.
        let trace = [13, 15, 12, 24, 25, 26, 28, 29, 30, 31, 4, 5];
        let mut lazy = build("lazy", &map, None, &cfg).unwrap();
        let l = simulate(lazy.as_mut(), 48, &trace, 0);
        assert_eq!(
            (l.faults, l.transferred, l.wasted, l.footprint),
            (12, 12, 0, 12)
        );
        let mut k = build("kaleidoscope", &map, None, &cfg).unwrap();
        let s = simulate(k.as_mut(), 48, &trace, 0);
        // Upfront: 0 1 2 3. Fault 13 brings 15 12 24 25 28 29 30 (26 is zero: left out); the
        // zero-filled fault on 26 reads ahead 31; fault 4 brings 5 8 10 11.
        assert_eq!(s.before_resume, 4);
        assert_eq!(s.faults, 3, "{s:?}"); // 13, 26, 4
        assert_eq!(s.zero_filled, 1);
        assert_eq!(s.prefetched, 7 + 1 + 4);
        assert_eq!(s.wasted, 4 + 3); // upfront frames and 8 10 11
        assert_eq!(s.footprint, 4 + 12 + 3);
        let mut b = build("blind", &map, None, &cfg).unwrap();
        let bl = simulate(b.as_mut(), 48, &trace, 0);
        assert!(bl.wasted > s.wasted, "{bl:?}");
        let mut e = build("upfront", &map, None, &cfg).unwrap();
        let ea = simulate(e.as_mut(), 48, &trace, 0);
        assert_eq!((ea.faults, ea.transferred, ea.wasted), (0, 48, 36));
        // FaaSnap with the trace as its recording: background only, nothing wasted.
        let mut f = build(
            "faasnap",
            &map,
            Some(&trace),
            &PolicyConfig::parse("faasnap_readahead=0").unwrap(),
        )
        .unwrap();
        let fs = simulate(f.as_mut(), 48, &trace, 2);
        assert_eq!(fs.wasted, 0);
        assert!(fs.faults < l.faults && fs.background > 0, "{fs:?}");
    }
}
