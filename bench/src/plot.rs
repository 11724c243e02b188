//! SVG plots of benchmark results (plotters' SVG backend, no system fonts needed).

use plotters::prelude::*;

/// One line of a plot.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points (x, y).
    pub points: Vec<(f64, f64)>,
}

/// Errors of plotting.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The drawing backend failed.
    #[error("drawing the plot failed: {0}")]
    Draw(String),
}

fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// A line chart as an SVG document: one line per series plus an optional dashed horizontal
/// reference line (e.g. the warm parent's throughput), like Kaleidoscope's warm-up figure.
pub fn line_chart_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    reference: Option<(&str, f64)>,
) -> Result<String, PlotError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let pts = series.iter().flat_map(|s| s.points.iter());
        let x_max = pts.clone().map(|p| p.0).fold(0.0f64, f64::max).max(1e-3) * 1.02;
        let y_max = pts
            .map(|p| p.1)
            .chain(reference.map(|r| r.1))
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(draw_err)?;
        for (i, s) in series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                .map_err(draw_err)?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        if let Some((label, y)) = reference {
            let grey = RGBColor(0x55, 0x55, 0x55);
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, y), (x_max, y)],
                    6,
                    4,
                    grey.stroke_width(1),
                ))
                .map_err(draw_err)?
                .label(label.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_polyline_per_series_and_the_labels() {
        let series = vec![
            Series {
                label: "lazy".into(),
                points: vec![(0.1, 1.0), (0.2, 5.0), (0.4, 9.0)],
            },
            Series {
                label: "kaleidoscope".into(),
                points: vec![(0.05, 4.0), (0.1, 9.5)],
            },
        ];
        let svg = line_chart_svg("t", "s", "req/s", &series, Some(("warm parent", 10.0))).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Each series is one polyline in its own color plus one legend sample.
        let lower = svg.to_ascii_lowercase();
        for color in ["#1f77b4", "#d62728"] {
            let lines = lower
                .split("<polyline")
                .skip(1)
                .filter(|p| p.split("/>").next().unwrap_or("").contains(color))
                .count();
            assert_eq!(lines, 2, "{color}");
        }
        assert!(!lower.contains("#2ca02c"), "no third series");
        for l in ["lazy", "kaleidoscope", "warm parent"] {
            assert!(
                svg.contains(&format!(">{l}<")) || svg.contains(l),
                "{l} missing"
            );
        }
    }
}
