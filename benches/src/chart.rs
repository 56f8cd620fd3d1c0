//! An SVG bar chart of the ratios to native, written without external tools.

use std::fmt::Write as _;

use crate::{significant, Record};

/// The axis spans ratios from 10^MIN_EXPONENT to 10^MAX_EXPONENT on a log
/// scale, because the systems differ by up to three orders of magnitude.
const MIN_EXPONENT: f64 = -3.0;
const MAX_EXPONENT: f64 = 1.0;

const LABEL_WIDTH: f64 = 170.0;
const PLOT_WIDTH: f64 = 520.0;
const VALUE_WIDTH: f64 = 70.0;
const BAR_HEIGHT: f64 = 14.0;
const BAR_GAP: f64 = 3.0;
const GROUP_GAP: f64 = 10.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 30.0;

/// Fill colour of each system's bars; other systems are grey.
fn colour(system: &str) -> &'static str {
    match system {
        "native" => "#777777",
        "chalk-ro" => "#1f77b4",
        "chalk-rw" => "#6baed6",
        "chalk-put" => "#3182bd",
        "bindfs" => "#ff7f0e",
        "rclone-off" => "#2ca02c",
        "rclone-full" => "#98df8a",
        _ => "#bbbbbb",
    }
}

/// Horizontal position of `ratio` on the plot, clamped to the axis.
fn x_of(ratio: f64) -> f64 {
    let exponent = ratio.log10().clamp(MIN_EXPONENT, MAX_EXPONENT);
    LABEL_WIDTH + (exponent - MIN_EXPONENT) / (MAX_EXPONENT - MIN_EXPONENT) * PLOT_WIDTH
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Renders one bar per record that has a ratio to native, grouped by
/// workload, with a line at 1.0 (native speed). `title` is shown on top.
pub(crate) fn ratio_chart(records: &[Record], title: &str) -> String {
    let bars: Vec<(&Record, f64)> = records
        .iter()
        .filter_map(|record| record.ratio_to_native.filter(|ratio| ratio.is_finite() && *ratio > 0.0).map(|ratio| (record, ratio)))
        .collect();
    let groups = {
        let mut ids: Vec<&str> = bars.iter().map(|(record, _)| record.workload.as_str()).collect();
        ids.dedup();
        ids.len()
    };
    let height = TOP + BOTTOM + bars.len() as f64 * (BAR_HEIGHT + BAR_GAP) + groups as f64 * GROUP_GAP;
    let width = LABEL_WIDTH + PLOT_WIDTH + VALUE_WIDTH;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="{width}" height="{height}" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{}" y="18" font-size="13" font-weight="bold">{}</text>"#, LABEL_WIDTH, escape(title));

    // Grid lines at each power of ten, labelled below the plot.
    let axis_bottom = height - BOTTOM;
    let mut exponent = MIN_EXPONENT;
    while exponent <= MAX_EXPONENT {
        let x = x_of(10f64.powf(exponent));
        let stroke = if exponent == 0.0 { r##"stroke="#000000" stroke-width="1.5""## } else { r##"stroke="#dddddd""## };
        let _ = writeln!(svg, r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{axis_bottom}" {stroke}/>"#);
        // Plain decimals: 0.001, 0.01, 0.1, 1, 10.
        let decimals = (-exponent).max(0.0) as usize;
        let label = format!("{:.decimals$}", 10f64.powf(exponent));
        let _ = writeln!(svg, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"#, axis_bottom + 14.0);
        exponent += 1.0;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">speed relative to native (log scale, higher is faster)</text>"#,
        LABEL_WIDTH + PLOT_WIDTH / 2.0,
        axis_bottom + 27.0
    );

    let mut y = TOP;
    let mut previous: Option<&str> = None;
    for (record, ratio) in &bars {
        if previous != Some(record.workload.as_str()) {
            y += GROUP_GAP;
            previous = Some(record.workload.as_str());
        }
        let start = x_of(10f64.powf(MIN_EXPONENT));
        let end = x_of(*ratio);
        let label = format!("{} {}", record.workload, record.system);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            LABEL_WIDTH - 6.0,
            y + BAR_HEIGHT - 3.0,
            escape(&label)
        );
        let _ = writeln!(
            svg,
            r#"<rect x="{start:.1}" y="{y:.1}" width="{:.1}" height="{BAR_HEIGHT}" fill="{}"/>"#,
            (end - start).max(1.0),
            colour(record.system)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            end + 4.0,
            y + BAR_HEIGHT - 3.0,
            significant(*ratio)
        );
        y += BAR_HEIGHT + BAR_GAP;
    }
    svg.push_str("</svg>\n");
    svg
}
