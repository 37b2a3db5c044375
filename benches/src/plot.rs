//! `--plot FILE.svg`: the latency percentile curve, or connections over time for `ceiling`.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;

/// Draws the report's curve. A report with neither curve draws nothing and says so.
pub fn draw(report: &Report, path: &Path) -> Result<(), String> {
    if !report.latency_curve.is_empty() {
        latency(report, path)
    } else if !report.connections_over_time.is_empty() {
        connections(report, path)
    } else {
        Err("this run has no curve to plot".to_string())
    }
}

fn latency(report: &Report, path: &Path) -> Result<(), String> {
    // x: the number of nines, -log10(1 - p/100), so p50..p99.999 spread evenly.
    let points: Vec<(f64, f64)> = report
        .latency_curve
        .iter()
        .filter(|(percentile, _)| *percentile < 100.0)
        .map(|(percentile, us)| (-(1.0 - percentile / 100.0).log10(), *us / 1000.0))
        .collect();
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.1).fold(0.001, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let title = format!(
        "hop-bench {} ({}): latency by percentile",
        report.scenario, report.target
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(x_max.ceil() as usize + 1)
        .x_label_formatter(&|nines| percentile_label(*nines))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(points, &BLUE))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn connections(report: &Report, path: &Path) -> Result<(), String> {
    let points = &report.connections_over_time;
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.1).max().unwrap_or(1).max(1) as f64 * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("hop-bench ceiling ({}): connections open", report.target),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("connections")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|(t, n)| (*t, *n as f64)),
            &BLUE,
        ))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// "p99.9" for 3 nines: the percentile with at most 4 decimals, trailing zeros dropped.
fn percentile_label(nines: f64) -> String {
    let percentile = format!("{:.4}", 100.0 - 100.0 * 10f64.powf(-nines));
    format!(
        "p{}",
        percentile.trim_end_matches('0').trim_end_matches('.')
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::LatencyRecorder;

    #[test]
    fn labels_name_percentiles() {
        assert_eq!(percentile_label(0.0), "p0");
        assert_eq!(percentile_label(1.0), "p90");
        assert_eq!(percentile_label(3.0), "p99.9");
        assert_eq!(percentile_label(5.0), "p99.999");
    }

    #[test]
    fn draws_an_svg_or_says_why_not() {
        let dir = std::env::temp_dir().join(format!("hop-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut report = Report::new("latency", "hop", "x");
        assert!(draw(&report, &dir.join("none.svg")).is_err());
        let mut recorder = LatencyRecorder::new();
        for value in 1..1000u64 {
            recorder.record_intended(0, value * 1000);
        }
        report.latency_curve = recorder.percentile_curve();
        let path = dir.join("latency.svg");
        draw(&report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("p99.9"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
