//! Results of the experiment: tables (Markdown), machine-readable files (JSON, CSV) and SVG
//! plots (plotters), written next to each other in one output directory.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::metrics::{savings, totals, ServiceMetrics, Totals};
use super::replay::ReplayReport;
use super::sim::SimRun;

/// Kaleidoscope's published cluster-simulation figures (AT&T hosting loads).
pub const KALEIDOSCOPE: [(&str, &str); 3] = [
    ("fewer overloads than cold", "98%"),
    ("less server usage", "26%"),
    ("smaller datacenter", "50%"),
];

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn draw<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot failed: {e}")
}

/// Write `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
}

/// The per-strategy totals table (Markdown), with savings against the first row (`cold`).
pub fn totals_table(rows: &[Totals]) -> String {
    let mut s = String::from(
        "| strategy | overload windows | of windows | failed | memory GiB·s | vCPU·s | peak workers (sum) | peak memory MiB (sum) | p50 ms | worst p99 ms | scale-out → first answer ms | fewer overloads | less memory | less vCPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let base = rows.first().cloned().unwrap_or_default();
    for r in rows {
        let (o, m, c) = savings(&base, r);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} | {:.1} | {} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0}% | {:.0}% | {:.0}% |",
            r.strategy,
            r.overloads,
            r.windows,
            r.failed,
            r.mem_gib_s,
            r.vcpu_s,
            r.peak_workers,
            r.peak_mem_bytes as f64 / (1 << 20) as f64,
            r.p50_ms,
            r.worst_p99_ms,
            r.first_answer_ms,
            o,
            m,
            c
        );
    }
    s
}

/// Per-service metrics as CSV.
pub fn services_csv(ms: &[ServiceMetrics]) -> String {
    let mut s = String::from("strategy,service,windows,overloads,requests,failed,mem_gib_s,vcpu_s,peak_workers,peak_mem_bytes,p50_ms,p99_ms,scale_outs,first_answer_p50_ms,first_answer_p90_ms\n");
    for m in ms {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{:.4},{:.3},{},{},{:.3},{:.3},{},{:.2},{:.2}",
            m.strategy,
            m.service,
            m.windows,
            m.overloads,
            m.requests,
            m.failed,
            m.mem_gib_s,
            m.vcpu_s,
            m.peak_workers,
            m.peak_mem_bytes,
            m.p50_ms,
            m.p99_ms,
            m.scale_outs,
            m.first_answer_p50_ms,
            m.first_answer_p90_ms
        );
    }
    s
}

/// Scatter: overloads (x) vs server usage (y), one point per strategy.
pub fn scatter_svg(
    title: &str,
    pts: &[(String, f64, f64)],
    x: &str,
    y: &str,
) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (800, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(draw)?;
        let xm = pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1.0) * 1.15;
        let ym = pts.iter().map(|p| p.2).fold(0.0f64, f64::max).max(1e-3) * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..xm, 0.0..ym)
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc(x)
            .y_desc(y)
            .draw()
            .map_err(draw)?;
        for (i, (name, px, py)) in pts.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(std::iter::once(Circle::new((*px, *py), 6, c.filled())))
                .map_err(draw)?
                .label(name.clone())
                .legend(move |(a, b)| Circle::new((a, b), 5, c.filled()));
            chart
                .draw_series(std::iter::once(Text::new(
                    name.clone(),
                    (*px, *py),
                    ("sans-serif", 13).into_font(),
                )))
                .map_err(draw)?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    Ok(out)
}

/// Named series of (x, y) points.
pub type NamedSeries = Vec<(String, Vec<(f64, f64)>)>;

/// Stacked panels sharing the x axis: each panel has a y label and named series.
pub fn panels_svg(title: &str, x: &str, panels: &[(&str, NamedSeries)]) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (900, 260 * panels.len() as u32 + 40))
            .into_drawing_area();
        root.fill(&WHITE).map_err(draw)?;
        let root = root.titled(title, ("sans-serif", 18)).map_err(draw)?;
        let areas = root.split_evenly((panels.len(), 1));
        let xm = panels
            .iter()
            .flat_map(|p| p.1.iter().flat_map(|s| s.1.iter().map(|q| q.0)))
            .fold(0.0f64, f64::max)
            .max(1e-3);
        for (area, (ylab, series)) in areas.iter().zip(panels) {
            let ym = series
                .iter()
                .flat_map(|s| s.1.iter().map(|q| q.1))
                .filter(|v| v.is_finite())
                .fold(0.0f64, f64::max)
                .max(1e-3)
                * 1.1;
            let mut chart = ChartBuilder::on(area)
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..xm, 0.0..ym)
                .map_err(draw)?;
            chart
                .configure_mesh()
                .x_desc(x)
                .y_desc(*ylab)
                .draw()
                .map_err(draw)?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let c = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(
                        pts.iter().map(|p| (p.0, p.1.min(ym))),
                        c.stroke_width(2),
                    ))
                    .map_err(draw)?
                    .label(name.clone())
                    .legend(move |(a, b)| PathElement::new(vec![(a, b), (a + 16, b)], c));
            }
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(draw)?;
        }
        root.present().map_err(draw)?;
    }
    Ok(out)
}

/// Write a replay's results (JSON, CSV, tables, plots) to `dir`; returns the Markdown summary.
pub fn write_replay(dir: &Path, r: &ReplayReport) -> anyhow::Result<String> {
    write(dir, "replay.json", &serde_json::to_string(r)?)?;
    write(dir, "trace.csv", &r.trace.to_csv())?;
    let all: Vec<ServiceMetrics> = r.runs.iter().flat_map(|x| x.services.clone()).collect();
    write(dir, "replay-services.csv", &services_csv(&all))?;
    let rows: Vec<Totals> = r
        .runs
        .iter()
        .map(|x| totals(x.strategy.name(), &x.services))
        .collect();
    write(
        dir,
        "replay-totals.json",
        &serde_json::to_string_pretty(&rows)?,
    )?;
    let pts: Vec<(String, f64, f64)> = rows
        .iter()
        .map(|t| (t.strategy.clone(), t.overloads as f64, t.mem_gib_s))
        .collect();
    write(
        dir,
        "replay-overloads-vs-usage.svg",
        &scatter_svg(
            "Replay: overload windows vs worker memory-seconds",
            &pts,
            "overload windows (all services)",
            "worker memory (GiB s)",
        )?,
    )?;
    // One service's load, workers and latency over time, every strategy.
    let mut load = Vec::new();
    let mut workers = Vec::new();
    let mut lat = Vec::new();
    for run in &r.runs {
        let tl = run
            .reports
            .first()
            .map(|v| v["timeline"].clone())
            .unwrap_or_default();
        let it = tl.as_array().cloned().unwrap_or_default();
        let f = |k: &dyn Fn(&serde_json::Value) -> f64| -> Vec<(f64, f64)> {
            it.iter()
                .map(|i| (i["t_s"].as_f64().unwrap_or(0.0), k(i)))
                .collect()
        };
        let w = r.config.window_ms / 1e3;
        if load.is_empty() {
            load.push((
                "arrivals".to_string(),
                f(&|i| i["arrived"].as_f64().unwrap_or(0.0) / w),
            ));
        }
        workers.push((
            run.strategy.name().to_string(),
            f(&|i| i["workers"].as_f64().unwrap_or(0.0)),
        ));
        lat.push((
            run.strategy.name().to_string(),
            f(&|i| i["latency"]["p90_us"].as_f64().unwrap_or(0.0) / 1e3),
        ));
    }
    let name = r.setup.first().map_or("service 0", |s| s.name.as_str());
    write(
        dir,
        "replay-service0-timeline.svg",
        &panels_svg(
            &format!("Replay: {name}, load, workers and p90 latency per strategy"),
            "time (s)",
            &[
                ("arrivals (req/s)", load),
                ("workers", workers),
                ("p90 latency (ms)", lat),
            ],
        )?,
    )?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{} services, {} strategies, {:.0} s per strategy (trace compressed {}x), SLO p90 <= {} ms per {} ms window\n",
        r.setup.len(),
        r.runs.len(),
        r.runs.iter().map(|x| x.wall_s).fold(0.0, f64::max),
        r.config.compress,
        r.config.slo.p90_ms,
        r.config.window_ms
    );
    md.push_str("| service | workload | warm capacity req/s | service p50 ms | parent boot ms | parent footprint MiB | arrivals |\n|---|---|---|---|---|---|---|\n");
    for s in &r.setup {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2} | {:.0} | {:.1} | {} |",
            s.name,
            s.workload,
            s.capacity_rps,
            s.service_ms,
            s.parent_boot_ms,
            s.parent_footprint_bytes as f64 / (1 << 20) as f64,
            s.arrivals
        );
    }
    md.push('\n');
    md.push_str(&totals_table(&rows));
    write(dir, "replay.md", &md)?;
    Ok(md)
}

/// Write simulation results (JSON, CSV, tables, plots) to `dir`; returns the Markdown.
pub fn write_sim(
    dir: &Path,
    prefix: &str,
    runs: &[SimRun],
    datacenter: &[(String, f64, Option<usize>)],
) -> anyhow::Result<String> {
    write(
        dir,
        &format!("{prefix}.json"),
        &serde_json::to_string(runs)?,
    )?;
    let all: Vec<ServiceMetrics> = runs.iter().flat_map(|x| x.services.clone()).collect();
    if !all.is_empty() {
        write(dir, &format!("{prefix}-services.csv"), &services_csv(&all))?;
    }
    let rows: Vec<Totals> = runs.iter().map(|r| r.totals.clone()).collect();
    let pts: Vec<(String, f64, f64)> = rows
        .iter()
        .map(|t| (t.strategy.clone(), t.overloads as f64, t.mem_gib_s))
        .collect();
    write(
        dir,
        &format!("{prefix}-overloads-vs-usage.svg"),
        &scatter_svg(
            "Simulation: overload windows vs worker memory-seconds",
            &pts,
            "overload windows (all services)",
            "worker memory (GiB s)",
        )?,
    )?;
    let mut md = totals_table(&rows);
    md.push_str("\n| strategy | datacenter peak workers | datacenter peak memory GiB | hosts for the peak | refused scale-outs |\n|---|---|---|---|---|\n");
    for r in runs {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {} | {} |",
            r.strategy.name(),
            r.dc_peak_workers,
            r.dc_peak_mem_bytes as f64 / (1u64 << 30) as f64,
            r.hosts_for_peak,
            r.refused
        );
    }
    if !datacenter.is_empty() {
        let mut csv = String::from("strategy,slo_p90_ms,smallest_hosts\n");
        let mut series: NamedSeries = Vec::new();
        md.push_str("\n| strategy | SLO p90 ms | smallest datacenter (hosts) meeting the overload target |\n|---|---|---|\n");
        for (s, slo, h) in datacenter {
            let _ = writeln!(
                csv,
                "{s},{slo},{}",
                h.map_or(String::from(""), |h| h.to_string())
            );
            let _ = writeln!(
                md,
                "| {s} | {slo} | {} |",
                h.map_or("not met".to_string(), |h| h.to_string())
            );
            if let Some(h) = h {
                match series.iter_mut().find(|x| x.0 == *s) {
                    Some(x) => x.1.push((*slo, *h as f64)),
                    None => series.push((s.clone(), vec![(*slo, *h as f64)])),
                }
            }
        }
        write(dir, &format!("{prefix}-datacenter.csv"), &csv)?;
        write(
            dir,
            &format!("{prefix}-datacenter-vs-slo.svg"),
            &panels_svg(
                "Simulation: smallest datacenter meeting the overload target vs SLO",
                "SLO: p90 latency bound (ms)",
                &[("hosts", series)],
            )?,
        )?;
    }
    write(dir, &format!("{prefix}.md"), &md)?;
    Ok(md)
}
