//! `latency.svg`: latency by percentile, on the usual HDR scale where each step to the right
//! adds a nine (0 %, 90 %, 99 %, 99.9 %, 99.99 %); `series.svg`: each second of the run,
//! inputs completed and their p50/p99, so a stall shows where it happened; and two lines
//! over time on two scales ([`over_time`]). All drawn with plotters' SVG backend.

use anyhow::{Result, anyhow};
use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::Report;
use crate::accounting::SecondPoint;

/// The nines shown: x runs from 0 (the minimum) to 4 (p99.99).
const NINES: f64 = 4.0;
/// Points per nine along each line.
const STEPS: u32 = 20;

/// A line's points: (nines, milliseconds), where p = 1 − 10^−nines.
fn percentiles(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    (0..=NINES as u32 * STEPS)
        .map(|i| {
            let nines = f64::from(i) / f64::from(STEPS);
            let q = 1.0 - 10f64.powf(-nines);
            (nines, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect()
}

/// The tick label at a whole number of nines.
fn nines_label(x: &f64) -> String {
    let n = x.round() as i32;
    let decimals = usize::try_from(n - 2).unwrap_or(0);
    match n {
        0 => "0%".into(),
        n => format!("{:.*}%", decimals, 100.0 - 100.0 * 10f64.powi(-n)),
    }
}

impl Report {
    pub(super) fn svg(&self) -> Result<String> {
        let lines: Vec<_> = [
            ("batch", RGBColor(0x1f, 0x77, 0xb4), &self.batch),
            ("stream", RGBColor(0xd6, 0x27, 0x28), &self.stream),
        ]
        .into_iter()
        .filter_map(|(name, colour, p)| {
            let h = p.as_ref()?.histogram.as_ref()?;
            Some((name, colour, percentiles(h)))
        })
        .collect();
        let max_ms = lines
            .iter()
            .flat_map(|(_, _, pts)| pts.iter().map(|p| p.1))
            .fold(1.0, f64::max);
        // Lines never fall, and the highest ends at the top right: the legend goes below.
        let mut svg = String::new();
        let err = |e| anyhow!("latency plot: {e:?}");
        {
            let root = SVGBackend::with_string(&mut svg, (720, 400)).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!("{} — latency by percentile", self.scenario.name),
                    ("sans-serif", 16),
                )
                .margin(12)
                .margin_right(32)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..NINES, 0.0..max_ms * 1.05)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_labels(NINES as usize + 1)
                .x_label_formatter(&nines_label)
                .y_label_formatter(&|ms| {
                    let s = format!("{ms:.3}");
                    s.trim_end_matches('0').trim_end_matches('.').to_owned()
                })
                .x_desc("percentile")
                .y_desc("latency (ms)")
                .light_line_style(BLACK.mix(0.08))
                .bold_line_style(BLACK.mix(0.25))
                .axis_style(BLACK.mix(0.8))
                .draw()
                .map_err(err)?;
            for (name, colour, pts) in lines {
                chart
                    .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
                    .map_err(err)?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(err)?;
            root.present().map_err(err)?;
        }
        Ok(svg)
    }
}

/// A line over time: its name and its (seconds, value) points.
pub struct Line<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
}

/// Two lines over one time axis, each on its own scale: `left` against the left axis,
/// `right` against the right one (a queue's depth beside the consumers draining it).
pub fn over_time(title: &str, left: &Line, right: &Line) -> Result<String> {
    let end = [left, right]
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let top = |l: &Line| l.points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let (blue, red) = (RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xd6, 0x27, 0x28));
    let mut svg = String::new();
    let err = |e| anyhow!("{title} plot: {e:?}");
    {
        let root = SVGBackend::with_string(&mut svg, (720, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(60)
            .build_cartesian_2d(0.0..end, 0.0..top(left))
            .map_err(err)?
            .set_secondary_coord(0.0..end, 0.0..top(right));
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(left.name)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(BLACK.mix(0.04))
            .bold_line_style(BLACK.mix(0.15))
            .draw()
            .map_err(err)?;
        chart
            .configure_secondary_axes()
            .y_desc(right.name)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(left.points.to_vec(), blue.stroke_width(2)))
            .map_err(err)?
            .label(left.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2))
            });
        chart
            .draw_secondary_series(LineSeries::new(right.points.to_vec(), red.stroke_width(2)))
            .map_err(err)?
            .label(right.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// One line of the series plot (`series.svg`): its name, colour and points.
type SeriesLine<'a> = (&'static str, RGBColor, &'a [SecondPoint]);

/// A value's ticks as text: at most three decimals, no trailing zeros.
fn tick(v: &f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// One panel of the series plot: the run's seconds across, `0..top` (with a tenth to spare)
/// up, its axes named and its gridlines drawn.
fn second_panel<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, Shift>,
    seconds: f64,
    top: f64,
    y_desc: &str,
) -> Result<
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    DrawingAreaErrorKind<std::io::Error>,
> {
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .margin_right(32)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..seconds, 0.0..top * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("second of the run")
        .y_desc(y_desc)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .light_line_style(BLACK.mix(0.08))
        .bold_line_style(BLACK.mix(0.25))
        .axis_style(BLACK.mix(0.8))
        .draw()?;
    Ok(chart)
}

impl Report {
    /// The lines of the series plot: each path of the platform, and the raw stream
    /// pipeline of the same run.
    fn series_lines(&self) -> Vec<SeriesLine<'_>> {
        let mut lines: Vec<SeriesLine<'_>> = Vec::new();
        if let Some(b) = &self.batch {
            lines.push(("batch", RGBColor(0x1f, 0x77, 0xb4), b.series.as_slice()));
        }
        if let Some(s) = &self.stream {
            lines.push(("stream", RGBColor(0xd6, 0x27, 0x28), s.series.as_slice()));
        }
        if let Some(r) = &self.stream_raw {
            lines.push((
                "raw stream",
                RGBColor(0x55, 0x55, 0x55),
                r.series.as_slice(),
            ));
        }
        lines.retain(|(_, _, pts)| !pts.is_empty());
        lines
    }

    /// `series.svg`: above, inputs completed per second; below, their p50 (thin) and p99
    /// (thick) latency per second, on the same time axis.
    pub(super) fn series_svg(&self) -> Result<String> {
        let lines = self.series_lines();
        let seconds = lines
            .iter()
            .filter_map(|(_, _, pts)| pts.last().map(|p| p.second))
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let top_rate = lines
            .iter()
            .flat_map(|(_, _, pts)| pts.iter().map(|p| p.completed as f64))
            .fold(1.0, f64::max);
        let top_ms = lines
            .iter()
            .flat_map(|(_, _, pts)| pts.iter().filter_map(|p| p.p99_ms))
            .fold(1.0, f64::max);
        let mut svg = String::new();
        let err = |e| anyhow!("series plot: {e:?}");
        {
            let root = SVGBackend::with_string(&mut svg, (720, 640)).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            let root = root
                .titled(
                    &format!("{} — each second of the run", self.scenario.name),
                    ("sans-serif", 16),
                )
                .map_err(err)?;
            let (upper, lower) = root.split_vertically(300);
            let mut rate =
                second_panel(&upper, seconds, top_rate, "completed per second").map_err(err)?;
            for (name, colour, pts) in &lines {
                let colour = *colour;
                let xy = pts.iter().map(|p| (p.second as f64, p.completed as f64));
                rate.draw_series(LineSeries::new(xy, colour.stroke_width(2)))
                    .map_err(err)?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                    });
            }
            rate.configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(err)?;
            let mut latency =
                second_panel(&lower, seconds, top_ms, "latency (ms): p99 thick, p50 thin")
                    .map_err(err)?;
            for (_, colour, pts) in &lines {
                let p99: fn(&SecondPoint) -> Option<f64> = |p| p.p99_ms;
                let p50: fn(&SecondPoint) -> Option<f64> = |p| p.p50_ms;
                for (width, pick) in [(3, p99), (1, p50)] {
                    // A second with no completions has no latency: the line breaks there.
                    for run in pts.split(|p| pick(p).is_none()) {
                        let xy = run.iter().filter_map(|p| Some((p.second as f64, pick(p)?)));
                        latency
                            .draw_series(LineSeries::new(xy, colour.stroke_width(width)))
                            .map_err(err)?;
                    }
                }
            }
            root.present().map_err(err)?;
        }
        Ok(svg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentile_axis_counts_nines() {
        let labels: Vec<String> = (0..=4).map(|n| nines_label(&f64::from(n))).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%"]);
        let mut h = crate::accounting::hist();
        for v in 1..=10_000u64 {
            h.saturating_record(v * 1000);
        }
        let pts = percentiles(&h);
        assert_eq!(pts.len(), 81);
        assert_eq!(pts[0], (0.0, 1.0), "the minimum, 1 ms");
        let p99 = pts[2 * STEPS as usize];
        assert!((p99.1 - 9900.0).abs() < 10.0, "{p99:?}");
        assert!(pts.windows(2).all(|w| w[0].1 <= w[1].1), "never falls");
    }

    #[test]
    fn a_plot_over_time_names_both_lines_and_both_axes() {
        let depth = [(0.0, 0.0), (1.0, 5000.0), (2.0, 100.0)];
        let consumers = [(0.0, 3.0), (1.0, 9.0), (2.0, 3.0)];
        let svg = over_time(
            "load step",
            &Line {
                name: "queue depth",
                points: &depth,
            },
            &Line {
                name: "consumers",
                points: &consumers,
            },
        )
        .expect("plots");
        for text in ["load step", "queue depth", "consumers", "seconds", "5000"] {
            assert!(svg.contains(text), "{text} missing");
        }
    }

    #[test]
    fn the_series_plot_draws_each_line_with_its_gaps() {
        let pts = |p99: &[Option<f64>]| -> Vec<SecondPoint> {
            p99.iter()
                .enumerate()
                .map(|(i, v)| SecondPoint {
                    second: i as u64,
                    completed: u64::from(v.is_some()) * 100,
                    p50_ms: v.map(|v| v / 2.0),
                    p99_ms: *v,
                })
                .collect()
        };
        let mut r: Report = serde_json::from_value(serde_json::json!({
            "schema_version": 2,
            "scenario": {"name": "s", "description": ""},
            "run_id": "r",
            "environment": {"cores": 1, "memory_bytes": 1, "os": "linux",
                "mongodb_version": "", "mongodb_server": "", "rabbitmq": "",
                "commit": "", "build": "", "peak_rss_bytes": 0},
            "wall_s": 1.0, "batch": null, "stream": null, "ceiling": null,
            "batch_fraction_of_ceiling": null, "reference": null
        }))
        .expect("a minimal report");
        r.stream_raw = Some(crate::report::StreamCeiling {
            messages: 200,
            elapsed_s: 3.0,
            throughput_per_s: 66.0,
            latency: crate::report::Latency::of(&crate::accounting::hist()),
            uncorrected: crate::report::Latency::of(&crate::accounting::hist()),
            series: pts(&[Some(4.0), Some(5.0), None, Some(8.0), Some(9.0)]),
            note: String::new(),
        });
        assert_eq!(r.series_lines().len(), 1, "only the paths with a series");
        let svg = r.series_svg().expect("drawn");
        assert!(
            svg.contains("completed per second"),
            "the rate axis is named"
        );
        assert!(svg.contains("second of the run"), "the time axis is named");
        // The raw pipeline's lines: its rate and its legend's; p99 and p50, each broken in
        // two by the empty second.
        let grey = svg
            .split("<polyline")
            .skip(1)
            .filter(|l| {
                l.split('>')
                    .next()
                    .is_some_and(|tag| tag.contains("#555555"))
            })
            .count();
        assert_eq!(grey, 2 + 2 * 2, "{svg}");
    }
}
