//! The CSV format and the PNG plot (throughput against threads, one line per variant).
//!
//! CSV: a header `gpu,variant,threads,mpairs_per_s`, then one row per variant and
//! thread count (the median over reps). Rows with `threads` = 0 are not throughput:
//! `gpu,bytes_per_live_block,0,<bytes>` (and `..._seed_replica`) carry the heap bytes
//! per live block. Rows of three fields (`variant,threads,mpairs_per_s`, as the PyTorch
//! anchor prints them) are accepted too.
//!
//! The plot is drawn with plotters' bitmap backend and a font compiled into the binary
//! (DejaVu Sans, see `DejaVuSans.LICENSE`), so it needs no system fonts and no network.

use plotters::prelude::*;
use plotters::style::FontStyle;
use std::collections::BTreeMap;
use std::path::Path;

/// CSV header line.
pub const HEADER: &str = "gpu,variant,threads,mpairs_per_s";

static FONT: &[u8] = include_bytes!("DejaVuSans.ttf");

/// One CSV row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The card's name ("NVIDIA H100 80GB HBM3", "sim", ...).
    pub gpu: String,
    /// The variant measured (or `bytes_per_live_block`).
    pub variant: String,
    /// Thread count (0 for rows that are not throughput).
    pub threads: usize,
    /// Million alloc+free pairs per second (or the row's value).
    pub value: f64,
}

impl Row {
    /// The row as a CSV line (no newline).
    pub fn to_csv(&self) -> String {
        format!("{},{},{},{:.4}", self.gpu, self.variant, self.threads, self.value)
    }
}

/// Parses the CSV text (header and blank lines skipped; a bad line is an error).
pub fn parse_csv(text: &str) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("gpu,") || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let (gpu, rest) = match f.len() {
            4 => (f[0].to_string(), &f[1..]),
            3 => (String::new(), &f[..]),
            _ => return Err(format!("line {}: expected 4 fields: {line}", n + 1)),
        };
        let bad = |what: &str| format!("line {}: bad {what}: {line}", n + 1);
        rows.push(Row {
            gpu,
            variant: rest[0].to_string(),
            threads: rest[1].parse().map_err(|_| bad("thread count"))?,
            value: rest[2].parse().map_err(|_| bad("value"))?,
        });
    }
    Ok(rows)
}

/// Line colours, distinct on white; variants beyond the list reuse them.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws throughput against threads (x: log2, y: log10), one line per variant, in the
/// order the variants first appear in `rows`. `title_gpu` names the card in the title
/// (default: the first row's gpu field).
pub fn plot(rows: &[Row], png: &Path, title_gpu: Option<&str>) -> Result<(), String> {
    // The font is registered once; a second registration just replaces it.
    for style in [FontStyle::Normal, FontStyle::Bold] {
        plotters::style::register_font("sans-serif", style, FONT)
            .map_err(|_| "the embedded font is not a valid TTF".to_string())?;
    }
    let mut order: Vec<&str> = Vec::new();
    let mut series: BTreeMap<&str, Vec<(usize, f64)>> = BTreeMap::new();
    // Throughput rows only: not the memory rows (bytes per block, reserved/live ratio).
    let throughput = |r: &&Row| {
        r.threads > 0 && !r.variant.starts_with("reserved_") && r.value.is_finite() && r.value > 0.0
    };
    for r in rows.iter().filter(throughput) {
        if !series.contains_key(r.variant.as_str()) {
            order.push(&r.variant);
        }
        series.entry(&r.variant).or_default().push((r.threads, r.value));
    }
    if order.is_empty() {
        return Err("no throughput rows to plot".to_string());
    }
    let gpu = title_gpu
        .map(str::to_string)
        .or_else(|| rows.iter().find(|r| !r.gpu.is_empty()).map(|r| r.gpu.clone()))
        .unwrap_or_default();
    let values = series.values().flatten();
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), &(_, v)| (lo.min(v), hi.max(v)));
    let y_lo = 10f64.powf(lo.log10().floor());
    let y_hi = 10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0));
    // Headroom above the data for the legend (upper right), so it never hides a line:
    // the legend takes about `frac` of the plot's height.
    let frac = ((order.len() * 26 + 24) as f64 / 640.0).min(0.6);
    let decades = (y_hi / y_lo).log10();
    let y_top = y_hi * 10f64.powf(decades * frac / (1.0 - frac)) * 1.1;
    let max_t = series.values().flatten().map(|&(t, _)| t).max().unwrap_or(1).max(2);
    let x_hi = (max_t as f64).log2().ceil();

    let root = BitMapBackend::new(png, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let title = if gpu.is_empty() {
        "Alloc+free pairs per second (aggregate)".to_string()
    } else {
        format!("Alloc+free pairs per second (aggregate) \u{2014} {gpu}")
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 30))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(90)
        .build_cartesian_2d(-0.2f64..x_hi + 0.2, (y_lo * 0.9..y_top).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("threads (each on its own stream)")
        .y_desc("million alloc+free pairs / s (log)")
        .x_labels(x_hi as usize + 1)
        .x_label_formatter(&|x| {
            // Labels only at whole powers of two (x is log2 of the thread count).
            if (x - x.round()).abs() < 1e-9 {
                format!("{}", 2f64.powf(x.round()))
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            if *y >= 1.0 { format!("{y:.0}") } else { format!("{}", (y * 1e4).round() / 1e4) }
        })
        .label_style(("sans-serif", 20))
        .axis_desc_style(("sans-serif", 22))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, name) in order.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts: Vec<(f64, f64)> =
            series[name].iter().map(|&(t, v)| ((t as f64).log2(), v)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        // PyTorch's anchors are the reference: dashed, so they read apart from ours.
        let style = color.stroke_width(3);
        if name.starts_with("torch_") {
            chart
                .draw_series(DashedLineSeries::new(pts.iter().copied(), 12, 8, style))
                .map_err(|e| e.to_string())?
                .label(name.to_string())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
        } else {
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), style))
                .map_err(|e| e.to_string())?
                .label(name.to_string())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
        }
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 20))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip_and_anchor_rows() {
        let text = format!(
            "{HEADER}\nH100,streamalloc,1,1.5000\nH100,bytes_per_live_block,0,90.0\n\
             torch_native,2,0.70\n"
        );
        let rows = parse_csv(&text).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].to_csv(), "H100,streamalloc,1,1.5000");
        assert_eq!(rows[2].variant, "torch_native");
        assert_eq!(rows[2].threads, 2);
        assert!(parse_csv("a,b\n").is_err());
    }
}
