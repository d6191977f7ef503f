//! Loss-curve plots: plotters' bitmap backend drawing with the font bundled in
//! `examples/fonts` (ab_glyph, no system font library), encoded to PNG here with flate2 (the
//! backend's own encoder would pull in the `image` crate).

use super::train::History;
use super::Result;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::io::Write;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// Registers the bundled font (once; later calls do nothing).
pub fn register_bundled_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the bundled font examples/fonts/DejaVuSans-subset.ttf is not a valid font".into())
    }
}

/// Line colours (matplotlib's tab10).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Exponential moving average with bias correction, window about `n / 40` points.
fn smooth(points: &[(usize, f64)]) -> Vec<(f64, f64)> {
    let window = (points.len() as f64 / 40.0).max(1.0);
    let beta = 1.0 - 1.0 / window;
    let (mut s, mut w) = (0.0, 0.0);
    points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(x, y)| {
            s = beta * s + (1.0 - beta) * y;
            w = beta * w + (1.0 - beta);
            (x as f64, s / w)
        })
        .collect()
}

/// A y range covering the curves, leaving out their first 5% of steps (the initial spike).
fn y_range(series: &[Vec<(f64, f64)>], x_max: f64, from_zero: bool) -> std::ops::Range<f64> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in series {
        for (i, &(x, y)) in s.iter().enumerate() {
            if !y.is_finite() {
                continue;
            }
            lo = lo.min(y);
            if x >= 0.05 * x_max || s.len() <= 2 || i + 1 == s.len() {
                hi = hi.max(y);
            }
        }
    }
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad)..(hi + pad)
}

struct Panel {
    title: &'static str,
    y_desc: &'static str,
    series: Vec<Vec<(f64, f64)>>,
    percent: bool,
}

/// Draws the runs' curves (train loss smoothed; validation loss; validation accuracy when
/// `classification`) side by side and writes them to `path` as PNG.
pub fn loss_curves(
    path: &Path,
    title: &str,
    runs: &[(&str, &History)],
    classification: bool,
) -> Result<()> {
    register_bundled_font()?;
    let mut panels = vec![
        Panel {
            title: "training loss (smoothed)",
            y_desc: "cross-entropy",
            series: runs.iter().map(|r| smooth(&r.1.train)).collect(),
            percent: false,
        },
        Panel {
            title: "validation loss",
            y_desc: "cross-entropy",
            series: runs
                .iter()
                .map(|r| r.1.val.iter().map(|&(x, y)| (x as f64, y)).collect())
                .collect(),
            percent: false,
        },
    ];
    if classification {
        panels.push(Panel {
            title: "validation accuracy",
            y_desc: "accuracy (%)",
            series: runs
                .iter()
                .map(|r| {
                    r.1.acc
                        .iter()
                        .map(|&(x, y)| (x as f64, 100.0 * y))
                        .collect()
                })
                .collect(),
            percent: true,
        });
    }
    let x_max = runs
        .iter()
        .flat_map(|r| r.1.train.last().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (w, h) = (560 * panels.len() as u32, 520u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(title, (FAMILY, 22))
            .map_err(|e| e.to_string())?;
        let areas = root.split_evenly((1, panels.len()));
        for (k, (panel, area)) in panels.iter().zip(areas.iter()).enumerate() {
            let y = y_range(&panel.series, x_max, panel.percent);
            let mut chart = ChartBuilder::on(area)
                .caption(panel.title, (FAMILY, 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..x_max, y)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("step")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc(panel.y_desc)
                .label_style((FAMILY, 13))
                .axis_desc_style((FAMILY, 15))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(|e| e.to_string())?;
            let names: Vec<&str> = runs.iter().map(|r| r.0).collect();
            draw_lines(&mut chart, &panel.series, &names, k == 0)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    write_png(path, w, h, &buf)
}

/// The mean over several curves at each x where any has a finite value, with their min and
/// max: (x, mean, min, max).
fn mean_band(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64, f64, f64)> {
    let mut by_x: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
    for c in curves {
        for &(x, y) in c.iter().filter(|p| p.1.is_finite()) {
            by_x.entry(x.round() as i64).or_default().push(y);
        }
    }
    by_x.into_iter()
        .map(|(x, ys)| {
            let mean = ys.iter().sum::<f64>() / ys.len() as f64;
            let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (x as f64, mean, lo, hi)
        })
        .collect()
}

struct BandPanel {
    title: &'static str,
    y_desc: &'static str,
    /// Per run: (x, mean, min, max) over its seeds.
    series: Vec<Vec<(f64, f64, f64, f64)>>,
    percent: bool,
}

/// Draws, for each optimizer, the mean over its seeds' runs of the training loss (each run
/// smoothed first), the validation loss and (when `classification`) the validation accuracy,
/// with a shaded band from the seeds' minimum to their maximum, and writes it to `path` as PNG.
pub fn seed_curves(
    path: &Path,
    title: &str,
    runs: &[(&str, Vec<&History>)],
    classification: bool,
) -> Result<()> {
    register_bundled_font()?;
    let band = |f: &dyn Fn(&History) -> Vec<(f64, f64)>| -> Vec<Vec<(f64, f64, f64, f64)>> {
        runs.iter()
            .map(|r| mean_band(&r.1.iter().map(|h| f(h)).collect::<Vec<_>>()))
            .collect()
    };
    let mut panels = vec![
        BandPanel {
            title: "training loss (smoothed; mean, min-max over seeds)",
            y_desc: "cross-entropy",
            series: band(&|h| smooth(&h.train)),
            percent: false,
        },
        BandPanel {
            title: "validation loss (mean, min-max over seeds)",
            y_desc: "cross-entropy",
            series: band(&|h| h.val.iter().map(|&(x, y)| (x as f64, y)).collect()),
            percent: false,
        },
    ];
    if classification {
        panels.push(BandPanel {
            title: "validation accuracy (mean, min-max)",
            y_desc: "accuracy (%)",
            series: band(&|h| h.acc.iter().map(|&(x, y)| (x as f64, 100.0 * y)).collect()),
            percent: true,
        });
    }
    let x_max = runs
        .iter()
        .flat_map(|r| r.1.iter().flat_map(|h| h.train.last().map(|p| p.0)))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (w, h) = (560 * panels.len() as u32, 520u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(title, (FAMILY, 22))
            .map_err(|e| e.to_string())?;
        let areas = root.split_evenly((1, panels.len()));
        for (k, (panel, area)) in panels.iter().zip(areas.iter()).enumerate() {
            let bounds: Vec<Vec<(f64, f64)>> = panel
                .series
                .iter()
                .flat_map(|s| {
                    [
                        s.iter().map(|p| (p.0, p.2)).collect(),
                        s.iter().map(|p| (p.0, p.3)).collect(),
                    ]
                })
                .collect();
            let y = y_range(&bounds, x_max, panel.percent);
            let mut chart = ChartBuilder::on(area)
                .caption(panel.title, (FAMILY, 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..x_max, y.clone())
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("step")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc(panel.y_desc)
                .label_style((FAMILY, 13))
                .axis_desc_style((FAMILY, 15))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(|e| e.to_string())?;
            let clamp = |v: f64| v.clamp(y.start, y.end);
            // The bands first, so every mean line lies on top of them.
            for (i, series) in panel.series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                if series.len() < 2 || series.iter().all(|p| p.2 == p.3) {
                    continue;
                }
                let mut poly: Vec<(f64, f64)> = series.iter().map(|p| (p.0, clamp(p.3))).collect();
                poly.extend(series.iter().rev().map(|p| (p.0, clamp(p.2))));
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        poly,
                        color.mix(0.18).filled(),
                    )))
                    .map_err(|e| e.to_string())?;
            }
            let means: Vec<Vec<(f64, f64)>> = panel
                .series
                .iter()
                .map(|s| s.iter().map(|p| (p.0, p.1)).collect())
                .collect();
            let names: Vec<&str> = runs.iter().map(|r| r.0).collect();
            draw_lines(&mut chart, &means, &names, k == 0)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    write_png(path, w, h, &buf)
}

/// One line per series in the run's color (dots too when there are at most 30 points), and with
/// `legend` the legend of `names`. Non-finite points are left out.
fn draw_lines<'a, 'b: 'a>(
    chart: &mut ChartContext<
        'a,
        BitMapBackend<'b>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    series: &[Vec<(f64, f64)>],
    names: &[&str],
    legend: bool,
) -> Result<()> {
    for (i, (series, name)) in series.iter().zip(names).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = series.iter().copied().filter(|p| p.1.is_finite()).collect();
        let drawn = chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        if legend {
            drawn.label(name.to_string()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        }
        if pts.len() <= 30 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Writes 8-bit RGB pixels as a PNG file (each row with the "Sub" filter, zlib level 9).
pub fn write_png(path: &Path, w: u32, h: u32, rgb: &[u8]) -> Result<()> {
    let stride = w as usize * 3;
    if rgb.len() != stride * h as usize {
        return Err(format!("write_png: {} bytes for {w}×{h} RGB", rgb.len()).into());
    }
    let mut raw = Vec::with_capacity((stride + 1) * h as usize);
    for row in rgb.chunks_exact(stride) {
        raw.push(1u8); // Sub: each byte minus the same channel of the pixel to its left
        for i in 0..stride {
            let left = if i >= 3 { row[i - 3] } else { 0 };
            raw.push(row[i].wrapping_sub(left));
        }
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&raw)?;
    let idat = z.finish()?;
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter set, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    let tmp = path.with_extension("png.tmp");
    std::fs::write(&tmp, &out).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
}
