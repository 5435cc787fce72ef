//! `latency.svg`: latency by percentile, on the usual HDR scale where each step to the right
//! adds a nine (0 %, 90 %, 99 %, 99.9 %, 99.99 %).

use super::Report;

/// A plotted line: name, colour, (log10 of 1/(1-percentile), milliseconds) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

impl Report {
    pub(super) fn svg(&self) -> String {
        // Latency by percentile on a log scale of 1/(1-p): the usual HDR percentile plot.
        let (w, h, m) = (720.0, 400.0, 60.0);
        let mut paths = String::new();
        let mut max_ms: f64 = 1.0;
        let series: Vec<Series> = [
            ("batch", "#1f77b4", &self.batch),
            ("stream", "#d62728", &self.stream),
        ]
        .into_iter()
        .filter_map(|(n, col, p)| {
            let h = p.as_ref()?.histogram.as_ref()?;
            let pts: Vec<(f64, f64)> = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999]
                .iter()
                .map(|q: &f64| {
                    (
                        (1.0 / (1.0 - q)).log10(),
                        h.value_at_quantile(*q) as f64 / 1000.0,
                    )
                })
                .collect();
            Some((n, col, pts))
        })
        .collect();
        for (_, _, pts) in &series {
            for (_, v) in pts {
                max_ms = max_ms.max(*v);
            }
        }
        let x = |lx: f64| m + lx / 4.0 * (w - 2.0 * m);
        let y = |v: f64| h - m - v / max_ms * (h - 2.0 * m);
        for (i, (name, col, pts)) in series.iter().enumerate() {
            let d: Vec<String> = pts
                .iter()
                .map(|(lx, v)| format!("{:.1},{:.1}", x(*lx), y(*v)))
                .collect();
            paths.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{col}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{}\" y=\"{}\" fill=\"{col}\">{name}</text>",
                d.join(" "),
                w - m - 60.0,
                m + 20.0 * (i as f64 + 1.0)
            ));
        }
        let mut axes = String::new();
        for (lx, label) in [
            (0.0, "0%"),
            (1.0, "90%"),
            (2.0, "99%"),
            (3.0, "99.9%"),
            (4.0, "99.99%"),
        ] {
            axes.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
                x(lx),
                h - m + 20.0
            ));
        }
        axes.push_str(&format!(
            "<text x=\"{}\" y=\"{}\">{max_ms:.1} ms</text><text x=\"10\" y=\"{}\">0</text>",
            5.0,
            m,
            h - m
        ));
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/><text x=\"{m}\" y=\"25\" font-size=\"14\">{} — latency by percentile (ms)</text><line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>{axes}{paths}</svg>",
            self.scenario.name,
            h - m,
            w - m,
            h - m,
            h - m
        )
    }
}
