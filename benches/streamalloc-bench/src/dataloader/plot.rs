//! The data-loader benchmark's CSV, PNG, table and goals.
//!
//! CSV: `gpu,variant,band,threads,batches_per_s,gb_per_s`, one row per variant, band and
//! thread count (the median run by batches/s). PNG: one panel per band, batches/s
//! (small) and GB/s (large) against threads, one line per variant, with the font
//! compiled in (no system fonts).

use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;

/// CSV header line.
pub const HEADER: &str = "gpu,variant,band,threads,batches_per_s,gb_per_s";

static FONT: &[u8] = include_bytes!("../DejaVuSans.ttf");

/// One CSV row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub gpu: String,
    pub variant: String,
    pub band: String,
    pub threads: usize,
    pub batches_per_s: f64,
    pub gb_per_s: f64,
}

/// Writes the rows under the header.
pub fn write_csv(path: &Path, rows: &[Row]) -> Result<(), String> {
    let mut text = format!("{HEADER}\n");
    for r in rows {
        text.push_str(&format!(
            "{},{},{},{},{:.1},{:.4}\n",
            r.gpu, r.variant, r.band, r.threads, r.batches_per_s, r.gb_per_s
        ));
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The value a band is judged by: batches/s for small batches, GB/s for large ones.
fn metric(r: &Row) -> (f64, &'static str) {
    if r.band == "small" { (r.batches_per_s, "batches/s") } else { (r.gb_per_s, "GB/s") }
}

/// One panel per band, the band's metric against threads (log2 x axis).
pub fn plot(rows: &[Row], path: &Path, title: &str) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "bad embedded font".to_string())?;
    let mut bands: Vec<&str> = rows.iter().map(|r| r.band.as_str()).collect();
    bands.dedup();
    if bands.is_empty() {
        return Err("nothing to plot".into());
    }
    let root = BitMapBackend::new(path, (900 * bands.len() as u32, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, bands.len()));
    for (panel, band) in panels.iter().zip(&bands) {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.band == *band).collect();
        let unit = metric(rs[0]).1;
        let max_t = rs.iter().map(|r| r.threads).max().unwrap_or(1).max(2) as f64;
        let max_y =
            rs.iter().map(|r| metric(r).0).filter(|v| v.is_finite()).fold(0.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{title}: {band} batches, {unit}"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d((1f64..max_t).log_scale(), 0f64..max_y.max(1e-9))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("producer threads")
            .y_desc(unit)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        let mut variants: Vec<&str> = rs.iter().map(|r| r.variant.as_str()).collect();
        variants.dedup();
        for (i, v) in variants.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = rs
                .iter()
                .filter(|r| r.variant == *v && metric(r).0.is_finite())
                .map(|r| (r.threads as f64, metric(r).0))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(*v)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// Prints one table per band: threads down, variants across.
pub fn print_table(rows: &[Row], card: &str, reps: u64) {
    let mut bands: Vec<&str> = rows.iter().map(|r| r.band.as_str()).collect();
    bands.dedup();
    for band in bands {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.band == band).collect();
        let mut variants: Vec<&str> = rs.iter().map(|r| r.variant.as_str()).collect();
        variants.dedup();
        let mut threads: Vec<usize> = rs.iter().map(|r| r.threads).collect();
        threads.sort_unstable();
        threads.dedup();
        println!();
        println!("{band} batches: batches/s | GB/s (median of {reps}), {card}");
        let mut head = format!("{:>7}", "threads");
        for v in &variants {
            head.push_str(&format!("  {v:>24}"));
        }
        println!("{head}");
        for t in threads {
            let mut line = format!("{t:>7}");
            for v in &variants {
                let cell = rs
                    .iter()
                    .find(|r| r.variant == *v && r.threads == t)
                    .map_or("-".to_string(), |r| {
                        format!("{:.0} | {:.2}", r.batches_per_s, r.gb_per_s)
                    });
                line.push_str(&format!("  {cell:>24}"));
            }
            println!("{line}");
        }
    }
}

/// The goals, judged on the rows: small batches at the most threads,
/// streamalloc >= 5x cudarc's own allocation; large batches, streamalloc >= 90% of the
/// copies alone.
pub fn print_goals(rows: &[Row], max_threads: usize) {
    let t = rows.iter().map(|r| r.threads).filter(|&t| t <= max_threads).max().unwrap_or(1);
    let get = |band: &str, v: &str| {
        rows.iter().find(|r| r.band == band && r.variant == v && r.threads == t).map(metric)
    };
    println!();
    match (get("small", "streamalloc_cached"), get("small", "cudarc_alloc")) {
        (Some((a, _)), Some((c, _))) => println!(
            "goal small batches, {t} threads: streamalloc_cached / cudarc_alloc = {:.2}x \
             (goal >= 5x: {})",
            a / c,
            if a / c >= 5.0 { "met" } else { "missed" }
        ),
        _ => println!("goal small batches: not measured (needs small band, cudarc_alloc: GPU)"),
    }
    match (get("large", "streamalloc_cached"), get("large", "memcpy_only")) {
        (Some((a, _)), Some((m, _))) => println!(
            "goal large batches, {t} threads: streamalloc_cached / memcpy_only = {:.1}% of the \
             copy bandwidth (goal >= 90%: {})",
            100.0 * a / m,
            if a / m >= 0.9 { "met" } else { "missed" }
        ),
        _ => println!("goal large batches: not measured (needs large band and memcpy_only)"),
    }
}
