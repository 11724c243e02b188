//! Prefetch policies for kscope clones, all implementing [`kscope_vmm::prefetch::Prefetcher`]
//! and built per clone from a [`ColorMap`] (and a recorded working set where needed). The
//! [`factory`] module colors a generation image and turns a [`PolicySpec`] into the VMM's
//! prefetcher factory (used by the clone service, the CLI and the benchmarks alike):
//!
//! | name | what it does |
//! |------|--------------|
//! | `lazy` | the faulting page only (SnowFlock lazy propagation) |
//! | `upfront` | every frame before the clone resumes (eager propagation as a policy; the `eager` *memory mode* is the copy without userfaultfd) |
//! | `blind` | the faulting page plus the next `blind_window` frames by physical address, color-blind |
//! | `kaleidoscope` | per-color rules (see [`config`]): file-order readahead for data files, pivot windows for code, same-color locality for data (readahead and locality windows ramp up on sequential streams), page tables and kernel code before resume, free and zero pages zero-filled |
//! | `reap` | the recorded working set before resume, the rest on demand (REAP) |
//! | `faasnap` | recorded accesses plus `faasnap_readahead` frames after each, by the background fetcher in recorded order, never blocking; all-zero frames zero-filled (FaaSnap) |
//! | `activeset` | the aligned `activeset_block`-frame blocks of the recorded pages before resume, then on demand in blocks (Picocenter) |
//! | `learned` | `kaleidoscope` with each color's rule and window learned from a recorded run by replaying it in the simulator, plus the recorded frames installed in the background in first-touch order (`learned_replay`) ([`learn`]) |
//!
//! A spec string is a name optionally followed by `:` and configuration items, e.g.
//! `kaleidoscope:user_data=local:16,page_table=background` ([`PolicySpec`]).

pub mod baselines;
pub mod config;
pub mod factory;
pub mod kaleidoscope;
pub mod learn;
pub mod sim;

pub use config::{ConfigError, PolicyConfig, Rule};
pub use factory::{color_generation, factory, GenerationMem};
use kscope_colorer::{Color, ColorMap, FrameSet};
pub use kscope_vmm::prefetch::{Fault, FaultPlan, Fill, Gfn, Install, OnDemand, Prefetcher};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Errors of policy construction.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The name is not a policy.
    #[error("unknown prefetch policy {0:?}: use one of lazy, upfront, blind, kaleidoscope, reap, faasnap, activeset, learned (the policy that fetches everything before resume is upfront; eager is a memory mode)")]
    Unknown(String),
    /// The policy replays a recording and none was given.
    #[error(
        "policy {0} replays a recorded working set: record one clone's faults first and pass them"
    )]
    NeedsRecording(&'static str),
    /// The policy reads the generation's colors and none were given.
    #[error("policy {0} needs the generation's color map: color the generation image first (kscope_policies::color_generation)")]
    NeedsColors(&'static str),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyName {
    /// The faulting page only.
    Lazy,
    /// Everything before resume.
    Upfront,
    /// Physical readahead, color-blind.
    Blind,
    /// Per-color rules.
    Kaleidoscope,
    /// Recorded working set before resume.
    Reap,
    /// Recorded loading set in the background.
    Faasnap,
    /// Recorded pages in blocks before resume.
    ActiveSet,
    /// Per-color rules learned from a recorded run.
    Learned,
}

impl PolicyName {
    /// Every policy.
    pub const ALL: [PolicyName; 8] = [
        PolicyName::Lazy,
        PolicyName::Upfront,
        PolicyName::Blind,
        PolicyName::Kaleidoscope,
        PolicyName::Reap,
        PolicyName::Faasnap,
        PolicyName::ActiveSet,
        PolicyName::Learned,
    ];

    /// The name as used in specs and statistics.
    pub const fn as_str(self) -> &'static str {
        match self {
            PolicyName::Lazy => "lazy",
            PolicyName::Upfront => "upfront",
            PolicyName::Blind => "blind",
            PolicyName::Kaleidoscope => "kaleidoscope",
            PolicyName::Reap => "reap",
            PolicyName::Faasnap => "faasnap",
            PolicyName::ActiveSet => "activeset",
            PolicyName::Learned => "learned",
        }
    }

    /// True if the policy needs a recorded working set.
    pub const fn needs_recording(self) -> bool {
        matches!(
            self,
            PolicyName::Reap | PolicyName::Faasnap | PolicyName::ActiveSet | PolicyName::Learned
        )
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyName {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n = s.trim().to_ascii_lowercase();
        PolicyName::ALL
            .into_iter()
            .find(|p| p.as_str() == n)
            .ok_or_else(|| PolicyError::Unknown(s.to_string()))
    }
}

/// Names of every policy.
pub fn names() -> Vec<&'static str> {
    PolicyName::ALL.iter().map(|p| p.as_str()).collect()
}

/// What the policies of one memory generation share (built once, used by many clones).
#[derive(Debug)]
pub struct PolicyContext {
    /// The generation's color map (colors, zero frames, files in file order).
    map: ColorMap,
    /// For every cached frame: its file (index in `map.file_pages`) and position in it.
    file_pos: HashMap<Gfn, (u32, u32)>,
}

impl PolicyContext {
    /// Precompute what policies need from `map`.
    pub fn new(map: &ColorMap) -> Arc<Self> {
        let file_pos = map
            .file_positions()
            .into_iter()
            .map(|(g, (f, p))| (g, (f as u32, p as u32)))
            .collect();
        Arc::new(PolicyContext {
            map: map.clone(),
            file_pos,
        })
    }

    /// Number of frames.
    pub fn frames(&self) -> u64 {
        self.map.frames()
    }

    /// Color of `gfn` (Unknown beyond the map).
    pub fn color(&self, gfn: Gfn) -> Color {
        self.map.color(gfn)
    }

    /// True if `gfn`'s content is all zero.
    pub fn is_zero(&self, gfn: Gfn) -> bool {
        self.map.zero.contains(gfn)
    }

    /// The file and position of a cached frame.
    pub fn file_pos(&self, gfn: Gfn) -> Option<(usize, usize)> {
        self.file_pos
            .get(&gfn)
            .map(|&(f, p)| (f as usize, p as usize))
    }

    /// The frames of file `f` in file order.
    pub fn file(&self, f: usize) -> &[Gfn] {
        self.map
            .file_pages
            .get(f)
            .map_or(&[], |p| p.gfns.as_slice())
    }
}

/// A policy and its configuration, parsed from `name[:items]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySpec {
    /// The policy.
    pub name: PolicyName,
    /// Its configuration.
    pub config: PolicyConfig,
}

impl FromStr for PolicySpec {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, items) = s.split_once(':').unwrap_or((s, ""));
        Ok(PolicySpec {
            name: name.parse()?,
            config: PolicyConfig::parse(items)?,
        })
    }
}

impl PolicySpec {
    /// The spec as shown in reports: the name, then `:` and the items that differ from the
    /// default configuration, if any (`learned:learned_replay=false`).
    pub fn label(&self) -> String {
        let default = PolicyConfig::default().render();
        let items: Vec<String> = self
            .config
            .render()
            .lines()
            .filter(|l| !default.lines().any(|d| d == *l))
            .map(|l| l.replace(' ', ""))
            .collect();
        if items.is_empty() {
            self.name.as_str().to_string()
        } else {
            format!("{}:{}", self.name.as_str(), items.join(","))
        }
    }

    /// Build the policy for one clone.
    pub fn build(
        &self,
        colors: &ColorMap,
        recording: Option<&[Gfn]>,
    ) -> Result<Box<dyn Prefetcher>, PolicyError> {
        self.build_with(PolicyContext::new(colors), recording)
    }

    /// Build the policy for one clone from a shared context.
    pub fn build_with(
        &self,
        ctx: Arc<PolicyContext>,
        recording: Option<&[Gfn]>,
    ) -> Result<Box<dyn Prefetcher>, PolicyError> {
        let c = &self.config;
        let rec = || recording.ok_or(PolicyError::NeedsRecording(self.name.as_str()));
        Ok(match self.name {
            PolicyName::Lazy => Box::new(OnDemand),
            PolicyName::Upfront => Box::new(baselines::Upfront::new(ctx.frames())),
            PolicyName::Blind => Box::new(baselines::Blind::new(ctx.frames(), c.blind_window)),
            PolicyName::Kaleidoscope => Box::new(kaleidoscope::Kaleidoscope::new(ctx, c.clone())),
            PolicyName::Reap => Box::new(baselines::Reap::new(ctx.frames(), rec()?)),
            PolicyName::Faasnap => {
                Box::new(baselines::FaaSnap::new(ctx, rec()?, c.faasnap_readahead))
            }
            PolicyName::ActiveSet => Box::new(baselines::ActiveSet::new(
                ctx.frames(),
                rec()?,
                c.activeset_block,
            )),
            PolicyName::Learned => {
                let rec = rec()?;
                let l = learn::learn(&ctx, rec, c, learn::DEFAULT_BUDGET);
                Box::new(learn::LearnedPolicy::new(ctx, l.config, rec.into()))
            }
        })
    }
}

/// Build policy `name` for one clone from `colors` (and `recording`, the frames one clone
/// touched, in order, for `reap`, `faasnap` and `activeset`).
pub fn build(
    name: &str,
    colors: &ColorMap,
    recording: Option<&[Gfn]>,
    config: &PolicyConfig,
) -> Result<Box<dyn Prefetcher>, PolicyError> {
    PolicySpec {
        name: name.parse()?,
        config: config.clone(),
    }
    .build(colors, recording)
}

/// Keep the first occurrence of each frame below `frames`, in order.
pub(crate) fn dedup_in_range(frames: u64, it: impl IntoIterator<Item = Gfn>) -> Vec<Gfn> {
    let mut seen = FrameSet::new(frames);
    let mut out = Vec::new();
    for g in it {
        if g < frames && !seen.contains(g) {
            seen.insert(g);
            out.push(g);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod testmap;

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// The prefetch frames a policy gives for a fault on `gfn`.
    pub fn fault(p: &mut dyn Prefetcher, gfn: Gfn) -> Vec<Gfn> {
        let mut plan = FaultPlan::default();
        p.on_fault(Fault { gfn, write: true }, &mut plan);
        assert!(plan.prefetch.iter().all(|i| i.fill == Fill::Data));
        gfns(plan.prefetch)
    }

    /// True if the policy zero-fills a fault on `gfn`.
    pub fn zero_fill(p: &mut dyn Prefetcher, gfn: Gfn) -> bool {
        let mut plan = FaultPlan::default();
        p.on_fault(Fault { gfn, write: true }, &mut plan);
        plan.fault == Fill::Zero
    }

    /// The frames of a list, in order.
    pub fn gfns(list: Vec<Install>) -> Vec<Gfn> {
        list.into_iter().map(|i| i.gfn).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_build() {
        let map = testmap::map();
        assert_eq!(
            names(),
            vec![
                "lazy",
                "upfront",
                "blind",
                "kaleidoscope",
                "reap",
                "faasnap",
                "activeset",
                "learned"
            ]
        );
        for n in names() {
            let rec: &[Gfn] = &[1, 2];
            let p = build(n, &map, Some(rec), &PolicyConfig::default()).unwrap();
            assert_eq!(p.name(), n);
            if n.parse::<PolicyName>().unwrap().needs_recording() {
                let e = build(n, &map, None, &PolicyConfig::default())
                    .err()
                    .unwrap();
                assert!(matches!(e, PolicyError::NeedsRecording(_)), "{e}");
            }
        }
        assert!(matches!(
            build("psychic", &map, None, &PolicyConfig::default()),
            Err(PolicyError::Unknown(_))
        ));
    }

    #[test]
    fn spec_strings() {
        let s: PolicySpec = "kaleidoscope:user_data=local:16,page_table=background"
            .parse()
            .unwrap();
        assert_eq!(s.name, PolicyName::Kaleidoscope);
        assert_eq!(s.config.rule(Color::UserData), Rule::Local(16));
        assert_eq!(s.config.rule(Color::PageTable), Rule::Background);
        let s: PolicySpec = "Blind".parse().unwrap();
        assert_eq!(
            (s.name, &s.config),
            (PolicyName::Blind, &PolicyConfig::default())
        );
        assert!("blind:window=3".parse::<PolicySpec>().is_err());
        assert_eq!(s.label(), "blind");
        let v: PolicySpec = "learned:learned_replay=no,user_data=local:16"
            .parse()
            .unwrap();
        assert_eq!(v.label(), "learned:user_data=local:16,learned_replay=false");
        let map = testmap::map();
        let ctx = PolicyContext::new(&map);
        let p = s.build_with(ctx.clone(), None).unwrap();
        assert_eq!(p.name(), "blind");
        assert_eq!(ctx.file(9), &[] as &[Gfn]);
    }

    #[test]
    fn dedup_keeps_first_in_range() {
        assert_eq!(dedup_in_range(10, [3, 1, 3, 12, 9, 1, 0]), vec![3, 1, 9, 0]);
    }
}
