//! The `kaleidoscope` policy: prefetch by locality within the same color, with a window per
//! color (the rules of [`crate::config`]). With `ramp` (the default) a `file:N` or `local:N`
//! window doubles, up to 8N, while a color's faults continue its last window, as the page
//! cache's readahead does for a sequential reader; `ramp = false` keeps the paper's fixed
//! windows.
//!
//! Frames that will be zero-filled (rule `zero`, or all-zero content with `zero_pages`) are
//! never put in a window nor in the pre-resume or background lists: allocation on demand makes every wasted
//! prefetch grow the clone's footprint, and a zero page costs nothing to serve on its own fault.

use crate::config::{PolicyConfig, Rule, RAMP_MAX};
use crate::PolicyContext;
use kscope_colorer::Color;
use kscope_vmm::prefetch::{Fault, FaultPlan, Fill, Gfn, Install, Prefetcher};
use std::sync::Arc;

/// Per-clone state of the `kaleidoscope` policy.
#[derive(Debug)]
pub struct Kaleidoscope {
    ctx: Arc<PolicyContext>,
    config: PolicyConfig,
    /// The last fault (the pivot) and its file position, if cached.
    pivot: Option<(Gfn, Option<(usize, usize)>)>,
    /// Name reported in statistics (`kaleidoscope`, or `learned` for a learned table).
    name: &'static str,
    /// Per color, the readahead stream of its last `file` or `local` window (with `ramp`).
    streams: [Stream; Color::COUNT],
}

/// Where a color's last `file` or `local` window was.
#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    /// The file (its index + 1), or 0 for physical frames.
    key: usize,
    /// Position of the last fault (file index or frame) and the last position its window
    /// covered.
    last: u64,
    end: u64,
    /// The last window (0: none yet).
    window: u64,
}

impl Kaleidoscope {
    /// A policy for one clone.
    pub fn new(ctx: Arc<PolicyContext>, config: PolicyConfig) -> Self {
        Self::named(ctx, config, "kaleidoscope")
    }

    /// A policy for one clone that reports `name` (e.g. `learned`).
    pub fn named(ctx: Arc<PolicyContext>, config: PolicyConfig, name: &'static str) -> Self {
        Kaleidoscope {
            ctx,
            config,
            pivot: None,
            name,
            streams: [Stream::default(); Color::COUNT],
        }
    }

    /// The window for a fault at `pos` of stream `key` (a file + 1, or 0 for frames) of color
    /// `c` under a rule of window `n`: with `ramp`, twice the color's last window if the fault
    /// continues it (after the last fault, at most one past the window's end), up to
    /// [`RAMP_MAX`] x `n`; else `n`.
    fn ramped(&mut self, c: Color, key: usize, pos: u64, n: u64) -> u64 {
        if !self.config.ramp {
            return n;
        }
        let s = &mut self.streams[c.index()];
        let w = if s.window > 0 && s.key == key && pos > s.last && pos <= s.end.saturating_add(1) {
            s.window.saturating_mul(2).min(n.saturating_mul(RAMP_MAX))
        } else {
            n
        };
        *s = Stream {
            key,
            last: pos,
            end: pos.saturating_add(w),
            window: w,
        };
        w
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The generation's colors.
    pub fn context(&self) -> &Arc<PolicyContext> {
        &self.ctx
    }

    /// True if `gfn` is served as a zero page instead of being fetched (rule `zero`, or
    /// all-zero content with `zero_pages`).
    pub fn zero_fill(&self, gfn: Gfn) -> bool {
        matches!(
            self.config.rule(self.ctx.color(gfn)),
            Rule::Zero | Rule::ZeroAhead(_)
        ) || (self.config.zero_pages && self.ctx.is_zero(gfn))
    }

    /// Every frame whose color has `rule`, ascending, minus zero-filled frames.
    fn frames_with(&self, rule: Rule) -> Vec<Install> {
        (0..self.ctx.frames())
            .filter(|&g| self.config.rule(self.ctx.color(g)) == rule && !self.zero_fill(g))
            .map(Install::data)
            .collect()
    }

    fn push(&self, g: Gfn, out: &mut Vec<Install>) {
        if !self.zero_fill(g) {
            out.push(Install::data(g));
        }
    }

    /// The `n` frames after `g` by physical address (clipped at the end of memory).
    fn ahead(&self, g: Gfn, n: u64) -> std::ops::Range<Gfn> {
        g.saturating_add(1)..g.saturating_add(n).saturating_add(1).min(self.ctx.frames())
    }

    /// Next `n` frames by physical address that have color `c`.
    fn local(&self, g: Gfn, c: Color, n: u64, out: &mut Vec<Install>) {
        for x in self.ahead(g, n) {
            if self.ctx.color(x) == c {
                self.push(x, out);
            }
        }
    }

    /// The `n` offsets of a pivot window, nearest first, starting on side `dir` (+1 or -1).
    fn pivot_offsets(n: u64, dir: i64) -> impl Iterator<Item = i64> {
        (1..=n as i64)
            .flat_map(move |k| [dir * k, -dir * k])
            .take(n as usize)
    }

    fn direction(from: u64, to: u64) -> i64 {
        if to >= from {
            1
        } else {
            -1
        }
    }
}

impl Prefetcher for Kaleidoscope {
    fn name(&self) -> &str {
        self.name
    }

    fn on_fault(&mut self, fault: Fault, plan: &mut FaultPlan) {
        let g = fault.gfn;
        if self.zero_fill(g) {
            plan.fault = Fill::Zero;
        }
        let out = &mut plan.prefetch;
        let frames = self.ctx.frames();
        if g >= frames {
            return;
        }
        let c = self.ctx.color(g);
        let pos = self.ctx.file_pos(g);
        match self.config.rule(c) {
            Rule::None | Rule::Upfront | Rule::Background | Rule::Zero => {}
            Rule::Local(n) => {
                let w = self.ramped(c, 0, g, n);
                self.local(g, c, w, out)
            }
            Rule::Span(n) => {
                for x in self.ahead(g, n) {
                    out.push(if self.zero_fill(x) {
                        Install::zero(x)
                    } else {
                        Install::data(x)
                    });
                }
            }
            Rule::ZeroAhead(n) => {
                for x in self.ahead(g, n) {
                    if self.ctx.color(x) == c {
                        out.push(Install::zero(x));
                    }
                }
            }
            Rule::File(n) => match pos {
                Some((f, p)) => {
                    let n = self.ramped(c, f + 1, p as u64, n);
                    let file = self.ctx.file(f);
                    let end = p
                        .saturating_add(n as usize)
                        .saturating_add(1)
                        .min(file.len());
                    for &x in file.get(p + 1..end).unwrap_or(&[]) {
                        self.push(x, out);
                    }
                }
                None => {
                    let w = self.ramped(c, 0, g, n);
                    self.local(g, c, w, out)
                }
            },
            Rule::Pivot(n) => match pos {
                Some((f, p)) => {
                    let dir = match self.pivot {
                        Some((_, Some((lf, lp)))) if lf == f => {
                            Self::direction(lp as u64, p as u64)
                        }
                        _ => 1,
                    };
                    let file = self.ctx.file(f);
                    for off in Self::pivot_offsets(n, dir) {
                        let q = p as i64 + off;
                        if let Some(&x) = usize::try_from(q).ok().and_then(|q| file.get(q)) {
                            self.push(x, out);
                        }
                    }
                }
                None => {
                    let dir = self.pivot.map_or(1, |(lg, _)| Self::direction(lg, g));
                    for off in Self::pivot_offsets(n, dir) {
                        let x = g as i64 + off;
                        if x >= 0 && (x as u64) < frames && self.ctx.color(x as u64) == c {
                            self.push(x as u64, out);
                        }
                    }
                }
            },
        }
        self.pivot = Some((g, pos));
    }

    fn before_resume(&mut self) -> Vec<Install> {
        self.frames_with(Rule::Upfront)
    }

    fn background(&mut self) -> Vec<Install> {
        self.frames_with(Rule::Background)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmap;

    fn policy(cfg: &str) -> Kaleidoscope {
        Kaleidoscope::new(
            PolicyContext::new(&testmap::map()),
            PolicyConfig::parse(cfg).unwrap(),
        )
    }

    fn fault(p: &mut Kaleidoscope, gfn: Gfn) -> Vec<Gfn> {
        crate::testutil::fault(p, gfn)
    }
    use crate::testutil::gfns;

    #[test]
    fn data_file_reads_ahead_in_file_order() {
        let mut p = policy("");
        // File order 13 15 12 24 25 26 28 29 30 31; 26 is zero (skipped).
        assert_eq!(fault(&mut p, 13), vec![15, 12, 24, 25, 28, 29, 30]);
        assert_eq!(fault(&mut p, 30), vec![31]);
        assert_eq!(fault(&mut p, 31), Vec::<Gfn>::new());
        let mut p = policy("page_cache_data=file:2");
        assert_eq!(fault(&mut p, 12), vec![24, 25]);
    }

    #[test]
    fn windows_ramp_up_on_a_sequential_stream_and_start_again_otherwise() {
        // File order 13 15 12 24 25 26 28 29 30 31 (positions 0-9); 26 is zero (skipped).
        let mut p = policy("page_cache_data=file:2");
        assert_eq!(fault(&mut p, 13), vec![15, 12]);
        // Position 3, just past the window (1-2): twice the window, positions 4-7.
        assert_eq!(fault(&mut p, 24), vec![25, 28, 29]);
        // Position 8, just past it again: 8, capped at RAMP_MAX x 2 = 16 by the file's end.
        assert_eq!(fault(&mut p, 30), vec![31]);
        // Back to the start of the file: not a continuation, the rule's window again.
        assert_eq!(fault(&mut p, 13), vec![15, 12]);
        // Without ramp the window stays.
        let mut p = policy("page_cache_data=file:2,ramp=false");
        assert_eq!(fault(&mut p, 13), vec![15, 12]);
        assert_eq!(fault(&mut p, 24), vec![25]);
        // Same-color physical windows ramp the same way: user data 4 5 7 8 10 11 (7 zero).
        let mut p = policy("user_data=local:2");
        assert_eq!(fault(&mut p, 4), vec![5]);
        assert_eq!(fault(&mut p, 7), vec![8, 10, 11]);
        let mut p = policy("user_data=local:2,ramp=false");
        assert_eq!(fault(&mut p, 4), vec![5]);
        assert_eq!(fault(&mut p, 7), vec![8]);
    }

    #[test]
    fn user_data_locality_within_the_color() {
        let mut p = policy("");
        // 5..=12: 6 is kernel data, 7 is zero, 9 free, 12 page cache.
        assert_eq!(fault(&mut p, 4), vec![5, 8, 10, 11]);
        // Clipped at the end of memory.
        assert_eq!(fault(&mut p, 44), vec![45, 46, 47]);
        assert_eq!(fault(&mut p, 27), Vec::<Gfn>::new());
    }

    #[test]
    fn span_crosses_colors_but_not_zero_pages() {
        let mut p = policy("user_data=span:8,free=zero:4");
        // 5..=12 whatever their color; 7 (zero) and 9 (free) as zero pages.
        let mut plan = FaultPlan::default();
        p.on_fault(
            Fault {
                gfn: 4,
                write: false,
            },
            &mut plan,
        );
        let fills: Vec<(Gfn, Fill)> = plan.prefetch.iter().map(|i| (i.gfn, i.fill)).collect();
        let (d, z) = (Fill::Data, Fill::Zero);
        assert_eq!(
            fills,
            [
                (5, d),
                (6, d),
                (7, z),
                (8, d),
                (9, z),
                (10, d),
                (11, d),
                (12, d)
            ]
        );
        // A free frame's fault zero-fills it and the next free frames of the next 4.
        let mut plan = FaultPlan::default();
        p.on_fault(
            Fault {
                gfn: 9,
                write: true,
            },
            &mut plan,
        );
        assert_eq!(plan.fault, Fill::Zero);
        assert!(plan
            .prefetch
            .iter()
            .all(|i| i.fill == Fill::Zero && i.gfn > 9 && i.gfn <= 13));
    }

    #[test]
    fn code_pivot_window_moves_with_faults() {
        let mut p = policy("");
        // Physical pivot for private user code: +1 -1 +2 -2, same color only.
        assert_eq!(fault(&mut p, 14), vec![16]);
        assert_eq!(fault(&mut p, 18), vec![16]);
        // The pivot moved down (18 -> 16): the window starts below.
        assert_eq!(fault(&mut p, 16), vec![14, 18]);
        // Executable page cache: pivot in file order (19 20 21 22), any color.
        assert_eq!(fault(&mut p, 20), vec![21, 19, 22]);
        // 21 is user code inside the file: file order, moving forward.
        assert_eq!(fault(&mut p, 21), vec![22, 20, 19]);
        // Moving backward within the file.
        assert_eq!(fault(&mut p, 19), vec![20, 21]);
        assert_eq!(fault(&mut p, 20), vec![21, 19, 22]);
        assert_eq!(fault(&mut p, 19), vec![20, 21]);
    }

    #[test]
    fn upfront_zero_and_background() {
        let mut p = policy("");
        assert_eq!(gfns(p.before_resume()), vec![0, 1, 2, 3]);
        assert_eq!(p.background(), Vec::<Install>::new());
        for g in [7, 9, 17, 23, 26, 33] {
            assert!(p.zero_fill(g), "{g}");
        }
        for g in [0, 4, 13, 14, 19] {
            assert!(!p.zero_fill(g), "{g}");
        }
        assert_eq!(fault(&mut p, 9), Vec::<Gfn>::new());
        assert_eq!(fault(&mut p, 1000), Vec::<Gfn>::new());
        let mut p = policy("page_table=background,kernel_code=none,zero_pages=false,free=none");
        assert_eq!(p.before_resume(), Vec::<Install>::new());
        assert_eq!(gfns(p.background()), vec![0, 3]);
        let mut plan = FaultPlan::default();
        p.on_fault(
            Fault {
                gfn: 23,
                write: false,
            },
            &mut plan,
        );
        assert_eq!(plan.fault, Fill::Zero);
        assert!(!p.zero_fill(7) && !p.zero_fill(9) && p.zero_fill(23));
        assert_eq!(fault(&mut p, 4), vec![5, 7, 8, 10, 11]);
        assert_eq!(p.name(), "kaleidoscope");
    }
}
