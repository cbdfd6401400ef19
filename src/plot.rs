//! PNG line plots (schedule curves, loss curves) with plotters and an embedded font, so
//! rendering needs no system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Error, Result};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// One line on a panel.
pub struct Series<'a> {
    pub label: &'a str,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// One panel: a title, axis labels and its lines.
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series<'a>>,
    pub log_y: bool,
}

fn register_font() {
    REGISTER.call_once(|| {
        // The font is compiled in; registration fails only on a malformed font file.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws panels side by side into one PNG, written atomically (a full disk leaves the old
/// file or none, never a truncated picture).
pub fn draw_panels(path: &Path, panels: &[Panel<'_>], width_each: u32, height: u32) -> Result<()> {
    register_font();
    let fail = |e: &dyn std::fmt::Display| Error::io(path, std::io::Error::other(e.to_string()));
    let width = width_each * panels.len().max(1) as u32;
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (area, panel) in areas.iter().zip(panels) {
            draw_panel(area, panel).map_err(|e| fail(&e))?;
        }
        root.present().map_err(|e| fail(&e))?;
    }
    let image = image::RgbImage::from_raw(width, height, pixels).ok_or_else(|| fail(&"plot buffer has the wrong size"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    image.write_to(&mut png, image::ImageFormat::Png).map_err(|e| fail(&e))?;
    crate::tensor_file::write_atomic(path, &png.into_inner())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(area: &Area<'_>, panel: &Panel<'_>) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let all = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all.filter(|(x, y)| x.is_finite() && y.is_finite() && (!panel.log_y || *y > 0.0)) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + y0.abs().max(1.0) * 0.1;
    }
    let pad = (y1 - y0) * 0.05;
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let series_style = |s: &Series<'_>| ShapeStyle::from(&s.color).stroke_width(2);
    if panel.log_y {
        let mut chart = builder.build_cartesian_2d(x0..x1, (y0 * 0.9..y1 * 1.1).log_scale())?;
        chart.configure_mesh().x_desc(panel.x_label).y_desc(panel.y_label).draw()?;
        for s in &panel.series {
            let pts = s.points.iter().copied().filter(|(_, y)| *y > 0.0 && y.is_finite());
            chart
                .draw_series(LineSeries::new(pts, series_style(s)))?
                .label(s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], s.color));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    } else {
        let mut chart = builder.build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
        chart.configure_mesh().x_desc(panel.x_label).y_desc(panel.y_label).draw()?;
        for s in &panel.series {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), series_style(s)))?
                .label(s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], s.color));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    Ok(())
}

/// `loss.png`: per-step loss, its running mean, and eval losses, from `metrics.jsonl`.
/// `eval_before` is drawn at step 0 (the eval before training has no metrics line).
pub fn loss_curve(path: &Path, metrics: &Path, eval_before: Option<f64>) -> Result<std::path::PathBuf> {
    let records = crate::metrics::read_jsonl(metrics)?;
    let loss: Vec<(f64, f64)> = records.iter().filter(|r| r.loss.is_finite() && r.loss > 0.0).map(|r| (r.step as f64, r.loss)).collect();
    let mut ema = Vec::with_capacity(loss.len());
    let mut acc: Option<f64> = None;
    for &(s, l) in &loss {
        let e = acc.map_or(l, |a| 0.9 * a + 0.1 * l);
        acc = Some(e);
        ema.push((s, e));
    }
    let evals: Vec<(f64, f64)> = eval_before
        .map(|e| (0.0, e))
        .into_iter()
        .chain(records.iter().filter_map(|r| r.eval_loss.map(|e| (r.step as f64, e))))
        .collect();
    let mut series = vec![
        Series { label: "loss", points: loss, color: RGBColor(160, 190, 230) },
        Series { label: "running mean", points: ema, color: RGBColor(31, 119, 180) },
    ];
    if !evals.is_empty() {
        series.push(Series { label: "eval loss", points: evals, color: RGBColor(214, 39, 40) });
    }
    draw_panels(path, &[Panel { title: "training loss (w(t)·MSE)", x_label: "step", y_label: "loss", series, log_y: true }], 800, 450)?;
    Ok(path.to_path_buf())
}
