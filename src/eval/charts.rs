//! The report's charts, as self-contained SVG: bars per variant with error
//! bars, and lines over a numeric axis (the scaling curve, the break-even).

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One measure per variant, with optional 95% intervals drawn as error bars.
pub(super) struct Series<'a> {
    pub label: &'a str,
    pub values: Vec<f64>,
    pub intervals: Option<Vec<(f64, f64)>>,
    pub color: RGBColor,
}

/// A horizontal bar chart (SVG) of one or two measures per variant.
pub(super) fn bar_chart(
    title: &str,
    names: &[String],
    series: &[Series<'_>],
    x_max: f64,
    unit: &str,
) -> Result<String> {
    let n = names.len();
    let mut svg = String::new();
    {
        let height = 90 + 44 * n as u32;
        // Room for the longest variant name (about 6.5 pixels a character).
        let longest = names.iter().map(|s| s.chars().count()).max().unwrap_or(0) as u32;
        let labels = (longest * 13 / 2 + 16).clamp(230, 460);
        let root = SVGBackend::with_string(&mut svg, (590 + labels, height)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {title}: {e}");
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(labels)
            .build_cartesian_2d(0f64..x_max, 0f64..n as f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n * 2 + 1)
            .y_label_formatter(&|y| {
                let i = y.floor() as usize;
                if (y - i as f64 - 0.5).abs() < 0.01 && i < n {
                    names[n - 1 - i].clone()
                } else {
                    String::new()
                }
            })
            .x_desc(unit)
            .draw()
            .map_err(err)?;
        let band = 0.7 / series.len() as f64;
        for (k, s) in series.iter().enumerate() {
            let color = s.color;
            let y0 = |i: usize| (n - 1 - i) as f64 + 0.15 + band * k as f64;
            chart
                .draw_series(s.values.iter().enumerate().map(|(i, &v)| {
                    Rectangle::new([(0.0, y0(i)), (v, y0(i) + band)], color.filled())
                }))
                .map_err(err)?
                .label(s.label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            for (i, &(lo, hi)) in s.intervals.iter().flatten().enumerate() {
                let (mid, cap) = (y0(i) + band / 2.0, band / 4.0);
                chart
                    .draw_series([
                        PathElement::new(vec![(lo, mid), (hi, mid)], BLACK.stroke_width(2)),
                        PathElement::new(
                            vec![(lo, mid - cap), (lo, mid + cap)],
                            BLACK.stroke_width(2),
                        ),
                        PathElement::new(
                            vec![(hi, mid - cap), (hi, mid + cap)],
                            BLACK.stroke_width(2),
                        ),
                    ])
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// One line of a [`line_chart`]: a value per x, with optional 95% intervals.
pub(super) struct Line<'a> {
    pub label: &'a str,
    pub values: Vec<f64>,
    pub intervals: Option<Vec<(f64, f64)>>,
    pub color: RGBColor,
}

/// A line chart (SVG) of `lines` over `xs`, on log axes where asked.
pub(super) fn line_chart(
    title: &str,
    xs: &[f64],
    lines: &[Line<'_>],
    (x_desc, y_desc): (&str, &str),
    (log_x, log_y): (bool, bool),
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (820, 420)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {title}: {e}");
        root.fill(&WHITE).map_err(err)?;
        let all = lines.iter().flat_map(|l| {
            l.values
                .iter()
                .copied()
                .chain(l.intervals.iter().flatten().flat_map(|&(lo, hi)| [lo, hi]))
        });
        let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
        let (x0, x1) = (
            xs.first().copied().unwrap_or(0.0),
            xs.last().copied().unwrap_or(1.0),
        );
        let (y0, y1) = match log_y {
            true => (lo.max(1e-6) / 1.5, hi.max(1e-6) * 1.5),
            false => (0.0, (hi * 1.1).max(1e-9)),
        };
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70);
        // The axes' types differ with their scales: draw through one closure.
        macro_rules! draw {
            ($chart:expr, $to_x:expr) => {{
                let mut chart = $chart.map_err(err)?;
                chart
                    .configure_mesh()
                    .x_desc(x_desc)
                    .y_desc(y_desc)
                    .draw()
                    .map_err(err)?;
                for l in lines {
                    let color = l.color;
                    let points: Vec<(f64, f64)> =
                        xs.iter().copied().zip(l.values.iter().copied()).collect();
                    chart
                        .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                        .map_err(err)?
                        .label(l.label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
                        });
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(err)?;
                    for (&x, &(a, b)) in xs.iter().zip(l.intervals.iter().flatten()) {
                        chart
                            .draw_series([PathElement::new(
                                vec![(x, a), (x, b)],
                                color.stroke_width(1),
                            )])
                            .map_err(err)?;
                    }
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .border_style(BLACK)
                    .background_style(WHITE)
                    .draw()
                    .map_err(err)?;
            }};
        }
        match (log_x, log_y) {
            (true, true) => draw!(
                builder.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale()),
                ()
            ),
            (true, false) => draw!(builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1), ()),
            (false, true) => draw!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()), ()),
            (false, false) => draw!(builder.build_cartesian_2d(x0..x1, y0..y1), ()),
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}
