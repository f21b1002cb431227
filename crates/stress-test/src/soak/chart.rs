//! The soak run as one SVG image: six panels over the minutes of the run, so a
//! trend (latency creeping up, a table that keeps growing, memory that never
//! levels off) shows at a glance.
//!
//! plotters is built without its font features: the SVG backend writes text as
//! `<text>` elements that the viewer renders, so no font files, fontconfig or
//! freetype are needed at build or run time; plotters only estimates the text
//! size for its layout.

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::Row;

const SIZE: (u32, u32) = (1200, 960);
const FONT: &str = "sans-serif";
/// plotters' GREEN (0, 255, 0) is hard to see on white.
const DARK_GREEN: RGBColor = RGBColor(0, 150, 0);

/// One line of a panel.
struct Series<'a> {
    label: &'static str,
    color: RGBColor,
    value: &'a dyn Fn(&Row) -> Option<f64>,
}

/// The chart of `rows` as an SVG document, with `title` above the panels.
pub fn svg(rows: &[Row], title: &str) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).context("cannot fill the chart")?;
        let root = root.titled(title, (FONT, 18)).context("cannot draw the title")?;
        let panels = root.split_evenly((3, 2));
        let count = |value: u64| Some(value as f64);
        let throughput =
            [Series { label: "accepted", color: BLUE, value: &|row| Some(row.accepted_per_s) }];
        let latency = [
            Series {
                label: "latency p50",
                color: DARK_GREEN,
                value: &|row| Some(row.latency_p50_ms),
            },
            Series { label: "latency p99", color: BLUE, value: &|row| Some(row.latency_p99_ms) },
            Series { label: "e2e lag p99", color: RED, value: &|row| row.e2e_lag_p99_ms },
        ];
        let swept = [
            Series {
                label: "processed_messages",
                color: BLUE,
                value: &|row| count(row.processed_messages),
            },
            Series {
                label: "idempotency_keys",
                color: RED,
                value: &|row| count(row.idempotency_keys),
            },
        ];
        let orders = [Series { label: "orders", color: BLACK, value: &|row| count(row.orders) }];
        let outbox = [
            Series { label: "rows", color: BLUE, value: &|row| count(row.outbox_rows) },
            Series { label: "pending", color: DARK_GREEN, value: &|row| count(row.outbox_pending) },
            Series {
                label: "dead tuples",
                color: RED,
                value: &|row| count(row.outbox_dead_tuples),
            },
        ];
        let memory = [
            Series { label: "order-service", color: BLUE, value: &|row| row.order_service_rss_mib },
            Series {
                label: "inventory-consumer",
                color: RED,
                value: &|row| row.inventory_consumer_rss_mib,
            },
        ];
        let layout: [(&str, &str, &[Series]); 6] = [
            ("throughput", "orders/s", &throughput),
            ("latency and end-to-end lag, per minute", "ms", &latency),
            ("swept tables", "rows", &swept),
            ("orders (kept)", "rows", &orders),
            ("outbox", "rows", &outbox),
            ("memory (RSS)", "MiB", &memory),
        ];
        for (panel, (caption, unit, series)) in panels.iter().zip(layout) {
            draw_panel(panel, rows, caption, unit, series)
                .with_context(|| format!("cannot draw the panel {caption:?}"))?;
        }
        root.present().context("cannot finish the chart")?;
    }
    Ok(svg)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    rows: &[Row],
    caption: &str,
    unit: &str,
    series: &[Series<'_>],
) -> anyhow::Result<()> {
    // x is the end of each minute: minute 1 is drawn at 1, the axis starts at 0.
    // Whole numbers, so that the axis is labelled in whole minutes.
    let minutes = rows.iter().map(|row| row.minute).max().unwrap_or(1).max(1);
    let top =
        series.iter().flat_map(|series| rows.iter().filter_map(series.value)).fold(0.0, f64::max);
    // Headroom above the data for the legend, about 15 % of the panel per line,
    // so that it hides no point; an empty panel still gets an axis.
    let headroom = 1.1 + 0.15 * series.len() as f64;
    let top = if top > 0.0 { top * headroom } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 16))
        .margin(10)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0..minutes, 0.0..top)?;
    let y_label = |value: &f64| compact(*value);
    chart
        .configure_mesh()
        .x_desc("minute")
        .y_desc(unit)
        .x_labels(minutes.min(15) as usize + 1)
        .y_label_formatter(&y_label)
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for series in series {
        let points: Vec<(u32, f64)> = rows
            .iter()
            .filter_map(|row| (series.value)(row).map(|value| (row.minute, value)))
            .collect();
        let color = series.color;
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(2))?
            .label(series.label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

/// Axis labels that stay short: 2.5, 950, 1.5k, 12k, 1.2M; no trailing `.0`.
fn compact(value: f64) -> String {
    let (scaled, suffix) = match value.abs() {
        v if v >= 1e6 => (value / 1e6, "M"),
        v if v >= 1e3 => (value / 1e3, "k"),
        _ => (value, ""),
    };
    let digits = if scaled.abs() >= 10.0 { 0 } else { 1 };
    let text = format!("{scaled:.digits$}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::super::tests::row;
    use super::*;

    #[test]
    fn the_chart_is_an_svg_with_every_panel_and_series() {
        let rows: Vec<Row> = (1..=4).map(row).collect();
        let svg = svg(&rows, "soak: 4 min at 100 orders/s").expect("drawn");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        for text in ["soak: 4 min", "throughput", "swept tables", "processed_messages", "MiB"] {
            assert!(svg.contains(text), "{text:?} is missing");
        }
    }

    #[test]
    fn a_single_minute_and_missing_figures_still_draw() {
        let rows = [Row { e2e_lag_p99_ms: None, order_service_rss_mib: None, ..row(1) }];
        assert!(svg(&rows, "one minute").is_ok());
        assert!(svg(&[], "nothing").is_ok());
    }

    #[test]
    fn axis_labels_are_compact() {
        assert_eq!(compact(0.0), "0");
        assert_eq!(compact(2.5), "2.5");
        assert_eq!(compact(8.0), "8");
        assert_eq!(compact(950.0), "950");
        assert_eq!(compact(1_500.0), "1.5k");
        assert_eq!(compact(6_000.0), "6k");
        assert_eq!(compact(72_400.0), "72k");
        assert_eq!(compact(1_240_000.0), "1.2M");
    }
}
