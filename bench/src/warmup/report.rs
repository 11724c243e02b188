//! The warm-up report: the goals evaluated on a run ([`goals`]) and the table
//! ([`render`]).

use super::{Goal, PolicyResult, WarmupReport};

/// The policies the goals are claimed for: Kaleidoscope's table, and the same mechanism with
/// a table learned from a recording.
const CLAIMED: [&str; 2] = ["kaleidoscope", "learned"];

/// How much sooner than `lazy` a claimed policy must be warm: at most this share of lazy's
/// time to warm.
const WARM_VS_LAZY: f64 = 0.5;

fn goal(goal: String, met: Option<bool>, evidence: String) -> Goal {
    Goal {
        goal,
        met,
        evidence,
    }
}

/// Evaluate the goals on `results`, for each claimed policy that was run.
pub fn goals(results: &[PolicyResult], ws_change: bool) -> Vec<Goal> {
    let get = |n: &str| results.iter().find(|r| r.policy == n);
    let claimed: Vec<&PolicyResult> = CLAIMED.iter().filter_map(|n| get(n)).collect();
    if claimed.is_empty() {
        return vec![goal(
            "kaleidoscope goals".into(),
            None,
            "neither kaleidoscope nor learned was run".into(),
        )];
    }
    let mut out = Vec::new();
    for k in claimed {
        let p = &k.policy;
        out.push(match get("lazy") {
            Some(l) => goal(
                format!("{p}'s time to warm is at most {WARM_VS_LAZY}x lazy's"),
                Some(k.warm_cost_ms <= WARM_VS_LAZY * l.warm_cost_ms),
                format!(
                    "{p} {:.1} ms, lazy {:.1} ms ({:.2}x)",
                    k.warm_cost_ms,
                    l.warm_cost_ms,
                    k.warm_cost_ms / l.warm_cost_ms.max(1e-9)
                ),
            ),
            None => goal(
                format!("{p}'s time to warm is at most {WARM_VS_LAZY}x lazy's"),
                None,
                "lazy was not run".into(),
            ),
        });
        out.push(match get("blind") {
            Some(b) => goal(
                format!("{p} is warm sooner than blind, with fewer pages"),
                Some(k.warm_cost_ms < b.warm_cost_ms && k.installed_pages < b.installed_pages),
                format!(
                    "time to warm {p} {:.1} ms, blind {:.1} ms (sooner in {} of {} rounds); pages {} vs {}",
                    k.warm_cost_ms,
                    b.warm_cost_ms,
                    rounds_sooner(k, b),
                    k.round_costs.len().min(b.round_costs.len()),
                    k.installed_pages,
                    b.installed_pages
                ),
            ),
            None => goal(
                format!("{p} is warm sooner than blind, with fewer pages"),
                None,
                "blind was not run".into(),
            ),
        });
        out.push(goal(
            format!("{p} installs no more than 1.2x the pages the lazy run touches"),
            Some(k.installed_per_touched <= 1.2),
            format!(
                "{:.2}x ({} installed, {} wasted)",
                k.installed_per_touched, k.installed_pages, k.wasted_pages
            ),
        ));
        for other in ["reap", "faasnap"] {
            let g = format!(
                "with a working-set change, {p}'s first K requests are at least as fast as {other}'s"
            );
            out.push(match (ws_change, get(other)) {
                (true, Some(o)) => goal(
                    g,
                    Some(k.first_k_ms <= o.first_k_ms),
                    format!("{p} {:.0} ms, {other} {:.0} ms", k.first_k_ms, o.first_k_ms),
                ),
                (false, _) => goal(g, None, "measured only with --ws-change".into()),
                (true, None) => goal(g, None, format!("{other} was not run")),
            });
        }
    }
    out
}

/// Rounds in which `a` lost less time than `b` (paired: same round, same warm reference).
fn rounds_sooner(a: &PolicyResult, b: &PolicyResult) -> usize {
    a.round_costs
        .iter()
        .zip(&b.round_costs)
        .filter(|(x, y)| x < y)
        .count()
}

/// The threshold time to warm, or the K requests' time if never warm.
fn fmt_threshold(r: &PolicyResult) -> String {
    match r.time_to_warm_ms {
        Some(t) => format!("{t:.0}"),
        None => format!(">{:.0}", r.first_k_ms),
    }
}

/// The report as a table with ratios against `lazy`.
pub fn render(r: &WarmupReport) -> String {
    use kscope_vmm::summary::fmt_bytes;
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "warm-up of {} clones ({} MiB, {} requests, {} in flight; {}{})",
        r.workload,
        r.mem_mib,
        r.requests,
        r.window,
        r.streams,
        if r.ws_change {
            ", working-set change"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "warm parent: {:.1} req/s (p50 {:.1} ms); warm reference clone: K requests in {:.1} ms ({:.1}-{:.1}); colored in {:.0} ms; recording {} pages; lazy touched {} pages",
        r.parent_rps,
        r.parent.latency.p50_us / 1e3,
        r.reference_k_ms[1],
        r.reference_k_ms[0],
        r.reference_k_ms[2],
        r.color_ms,
        r.recorded_pages,
        r.touched_pages
    );
    let _ = writeln!(
        s,
        "time to warm = time lost against the warm reference over the K requests, clone call included (median (min-max) over {} rounds)",
        r.policies.first().map_or(0, |p| p.clones)
    );
    let _ = writeln!(
        s,
        "{:<13} {:>9} {:>10} {:>26} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>6} {:>10}",
        "policy",
        "clone ms",
        "first ms",
        "time to warm ms (x lazy)",
        "blk flts",
        "blocked ms",
        "thresh ms",
        "installed",
        "wasted",
        "zeroed",
        "/touch",
        "footprint"
    );
    let lazy = r.policies.iter().find(|p| p.policy == "lazy");
    for p in &r.policies {
        let x = lazy.map_or(String::new(), |l| {
            format!(" {:.2}x", p.warm_cost_ms / l.warm_cost_ms.max(1e-9))
        });
        let warm = format!(
            "{:.1} ({:.1}-{:.1}){x}",
            p.warm_cost_ms, p.warm_cost_spread[0], p.warm_cost_spread[2]
        );
        let _ = writeln!(
            s,
            "{:<13} {:>9.1} {:>10.1} {:>26} {:>9} {:>10.1} {:>9} {:>9} {:>8} {:>8} {:>6.2} {:>10}",
            p.policy,
            p.clone_ms,
            p.first_response_ms,
            warm,
            p.blocking_faults,
            p.blocked_ms,
            fmt_threshold(p),
            p.installed_pages,
            p.wasted_pages,
            p.zero_filled,
            p.installed_per_touched,
            fmt_bytes(p.footprint_bytes)
        );
    }
    let _ = writeln!(
        s,
        "served from the call within {:.0} ms (half the parent's time for K) vs the warm parent, median (min-max); per {:.0} ms window (medians):",
        r.horizon_ms, r.slot_ms
    );
    for p in &r.policies {
        let w: Vec<String> = p.window_ratios.iter().map(|x| format!("{x:.2}")).collect();
        let _ = writeln!(
            s,
            "  {:<13} {:.2} ({:.2}-{:.2}) over {} clones; windows [{}]",
            p.policy,
            p.served_ratio_spread[1],
            p.served_ratio_spread[0],
            p.served_ratio_spread[2],
            p.clones,
            w.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "blocking faults by color of the faulting frame (first round):"
    );
    for p in &r.policies {
        let by: Vec<String> = p
            .faults_by_color
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        let _ = writeln!(s, "  {:<13} {}", p.policy, by.join(", "));
    }
    if let Some(l) = lazy {
        for p in r.policies.iter().filter(|p| p.policy != "lazy") {
            let _ = writeln!(
                s,
                "  {}: {:.2}x lazy time to warm, {:.2}x lazy time blocked, {:.2}x lazy blocking faults, {:.2}x lazy first-K time",
                p.policy,
                p.warm_cost_ms / l.warm_cost_ms.max(1e-9),
                p.blocked_ms / l.blocked_ms.max(1e-9),
                p.blocking_faults as f64 / (l.blocking_faults.max(1)) as f64,
                p.first_k_ms / l.first_k_ms.max(1e-9),
            );
        }
    }
    let _ = writeln!(s, "goals:");
    for g in &r.goals {
        let v = match g.met {
            Some(true) => "MET",
            Some(false) => "NOT MET",
            None => "not measured",
        };
        let _ = writeln!(s, "  [{v}] {} — {}", g.goal, g.evidence);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_compare_times_to_warm_pages_and_first_k() {
        let p = |name: &str, cost: f64, k: f64, pages: u64, ratio: f64| PolicyResult {
            policy: name.into(),
            warm_cost_ms: cost,
            first_k_ms: k,
            installed_pages: pages,
            installed_per_touched: ratio,
            ..Default::default()
        };
        let rs = vec![
            p("lazy", 40.0, 900.0, 1000, 1.0),
            p("blind", 15.0, 950.0, 1300, 1.3),
            p("kaleidoscope", 19.0, 800.0, 1100, 1.1),
            p("reap", 5.0, 700.0, 1000, 1.0),
            p("faasnap", 30.0, 850.0, 1000, 1.0),
        ];
        let g = goals(&rs, true);
        let met: Vec<Option<bool>> = g.iter().map(|g| g.met).collect();
        // <= 0.5x lazy: yes; sooner than blind: no (19 > 15); pages: yes; vs reap: no; faasnap:
        // yes.
        assert_eq!(
            met,
            vec![Some(true), Some(false), Some(true), Some(false), Some(true)]
        );
        assert_eq!(goals(&rs, false)[3].met, None);
        // A learned table is judged too, with its own numbers.
        let mut with_learned = rs.clone();
        with_learned.push(p("learned", 10.0, 790.0, 1050, 1.05));
        let g = goals(&with_learned, false);
        assert_eq!(g.len(), 10);
        assert_eq!(g[5].met, Some(true));
        assert_eq!(g[6].met, Some(true), "{}", g[6].evidence);
        // Half of lazy exactly counts; more does not.
        let edge = vec![
            p("lazy", 40.0, 900.0, 1000, 1.0),
            p("kaleidoscope", 20.0, 0.0, 0, 1.0),
        ];
        assert_eq!(goals(&edge, false)[0].met, Some(true));
        let over = vec![
            p("lazy", 40.0, 900.0, 1000, 1.0),
            p("kaleidoscope", 20.5, 0.0, 0, 1.0),
        ];
        assert_eq!(goals(&over, false)[0].met, Some(false));
        // Rounds are paired by index.
        let mut a = p("learned", 10.0, 0.0, 0, 1.0);
        let mut b = p("blind", 15.0, 0.0, 0, 1.0);
        a.round_costs = vec![5.0, 30.0, 10.0];
        b.round_costs = vec![20.0, 15.0, 12.0];
        assert_eq!(rounds_sooner(&a, &b), 2);
        assert_eq!(rounds_sooner(&b, &a), 1);
        let g = goals(&[p("lazy", 40.0, 0.0, 0, 1.0), a, b], false);
        assert!(
            g[1].evidence.contains("sooner in 2 of 3 rounds"),
            "{}",
            g[1].evidence
        );
    }
}
