//! Training curves from a run's `metrics.jsonl` (one JSON object per line with an integer
//! `step` and numeric metrics such as `train/loss`, `train/lr`, `eval/loss`, `eval/ppl`):
//! `loss.png` (training loss, and validation loss where recorded) and `lr.png` (learning rate).
//!
//! Drawn with plotters' bitmap backend and its `ab_glyph` text renderer, which needs no system
//! font library: the text uses DejaVu Sans, embedded by the `dejavu` crate (Bitstream Vera
//! licence with DejaVu's public-domain changes; the crate's code is MIT/Apache-2.0). Files are
//! drawn to a temporary `.png` in the output directory and renamed into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;
use serde_json::Value;

use crate::error::{EvalError, Result};

/// File name of the metrics log inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Keys accepted for each curve, first found wins.
const TRAIN_LOSS: [&str; 3] = ["train/loss", "loss", "train_loss"];
const EVAL_LOSS: [&str; 4] = ["eval/loss", "val/loss", "eval_loss", "val_loss"];
const LEARNING_RATE: [&str; 4] = ["train/lr", "lr", "learning_rate", "train/learning_rate"];

/// Every numeric metric of a log, as `(step, value)` points in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsLog {
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
}

impl MetricsLog {
    /// The first series among `keys` that has points.
    pub fn find(&self, keys: &[&str]) -> Option<(&str, &[(u64, f64)])> {
        keys.iter().find_map(|k| {
            self.series
                .get_key_value(*k)
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.as_str(), v.as_slice()))
        })
    }
}

/// Reads a `metrics.jsonl`: every line an object with a non-negative integer `step`; other
/// keys with finite numeric values become series (strings and the like are ignored).
pub fn read_metrics(path: &Path) -> Result<MetricsLog> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let mut log = MetricsLog::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |key: &str, expected: &str, found: String| EvalError::Record {
            path: path.to_path_buf(),
            line: i + 1,
            key: key.into(),
            expected: expected.into(),
            found,
        };
        let value: Value = serde_json::from_str(line).map_err(|e| EvalError::Json {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        let Value::Object(obj) = value else {
            return Err(bad(
                "(record)",
                "a JSON object",
                "another JSON value".into(),
            ));
        };
        let step = match obj.get("step") {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| bad("step", "a non-negative integer", v.to_string()))?,
            None => return Err(bad("step", "a non-negative integer", "no such key".into())),
        };
        for (key, v) in &obj {
            if key == "step" {
                continue;
            }
            if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                log.series.entry(key.clone()).or_default().push((step, x));
            }
        }
    }
    Ok(log)
}

fn font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans font cannot be parsed".to_string())
        })
        .clone()
}

/// One curve of a chart.
struct Curve<'a> {
    label: &'a str,
    points: &'a [(u64, f64)],
    color: RGBColor,
    markers: bool,
}

/// A y-axis tick: plain decimals for ordinary magnitudes, scientific notation otherwise.
fn tick_label(value: f64, range: f64) -> String {
    let magnitude = value.abs().max(range.abs());
    if value == 0.0 {
        "0".into()
    } else if (1e-2..1e5).contains(&magnitude) {
        let decimals = (2.0 - range.abs().max(1e-12).log10().floor()).clamp(0.0, 6.0) as usize;
        format!("{value:.decimals$}")
    } else {
        format!("{value:.2e}")
    }
}

const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;

/// Draws a `WIDTH` x `HEIGHT` PNG into `path`: the font registered, a white canvas for `paint`,
/// the file staged and renamed into place; errors name the file.
fn png(
    path: &Path,
    paint: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    let fail = |message: String| EvalError::Plot {
        path: path.to_path_buf(),
        message,
    };
    font().map_err(fail)?;
    let tmp = hone_io::StagedFile::new(path).map_err(|e| fail(e.source.to_string()))?;
    {
        let root = BitMapBackend::new(tmp.path(), (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        paint(&root).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    tmp.commit().map_err(|e| fail(e.source.to_string()))?;
    Ok(())
}

fn draw(path: &Path, title: &str, y_label: &str, curves: &[Curve<'_>]) -> Result<()> {
    let fail = |message: String| EvalError::Plot {
        path: path.to_path_buf(),
        message,
    };
    let points = curves.iter().flat_map(|c| c.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (u64::MAX, 0u64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(fail("no points to draw".into()));
    }
    if x1 == x0 {
        x1 = x0 + 1;
    }
    let pad = ((y1 - y0).abs() * 0.05).max(y1.abs() * 1e-3).max(1e-12);
    let (y0, y1) = (y0 - pad, y1 + pad);

    png(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(96)
            .build_cartesian_2d(x0 as f64..x1 as f64, y0..y1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| tick_label(*v, y1 - y0))
            .draw()
            .map_err(|e| e.to_string())?;
        for curve in curves {
            let color = curve.color;
            let series = curve.points.iter().map(|&(x, y)| (x as f64, y));
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(curve.label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            if curve.markers {
                chart
                    .draw_series(series.map(|p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| e.to_string())?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// Draws the curves of `run_dir/metrics.jsonl` into `out_dir`: `loss.png` (training and, where
/// present, validation loss) and `lr.png`. Returns the files written. A log without a training
/// or validation loss is an error naming the keys looked for.
pub fn plot_run(run_dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let metrics_path = run_dir.join(METRICS_FILE);
    if !metrics_path.is_file() {
        return Err(EvalError::MissingPath {
            path: metrics_path,
            what: "a training run's metrics log",
        });
    }
    let log = read_metrics(&metrics_path)?;
    plot_metrics(&log, &metrics_path, out_dir)
}

/// Draws the curves of an already read log (see [`plot_run`]); `source` names it in errors.
pub fn plot_metrics(log: &MetricsLog, source: &Path, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut curves = Vec::new();
    if let Some((key, points)) = log.find(&TRAIN_LOSS) {
        curves.push(Curve {
            label: key,
            points,
            color: RGBColor(31, 119, 180),
            markers: false,
        });
    }
    if let Some((key, points)) = log.find(&EVAL_LOSS) {
        curves.push(Curve {
            label: key,
            points,
            color: RGBColor(214, 39, 40),
            markers: true,
        });
    }
    if curves.is_empty() {
        return Err(EvalError::Plot {
            path: source.to_path_buf(),
            message: format!(
                "no loss to plot: expected one of the keys {} or {}",
                TRAIN_LOSS.join(", "),
                EVAL_LOSS.join(", ")
            ),
        });
    }
    let loss_path = out_dir.join("loss.png");
    draw(&loss_path, "Loss", "loss (nats/token)", &curves)?;
    written.push(loss_path);
    match log.find(&LEARNING_RATE) {
        Some((key, points)) => {
            let lr_path = out_dir.join("lr.png");
            let curve = Curve {
                label: key,
                points,
                color: RGBColor(44, 160, 44),
                markers: false,
            };
            draw(&lr_path, "Learning rate", "learning rate", &[curve])?;
            written.push(lr_path);
        }
        None => tracing::warn!(
            "{}: no learning rate ({}) to plot",
            source.display(),
            LEARNING_RATE.join(", ")
        ),
    }
    Ok(written)
}

/// A scatter plot of labelled points `(label, x, y)` (one colour per point, its label beside
/// it), drawn to `path` (staged, then renamed).
pub fn scatter(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(String, f64, f64)],
) -> Result<()> {
    if points.is_empty() {
        return Err(EvalError::Plot {
            path: path.to_path_buf(),
            message: "no points to draw".into(),
        });
    }
    let (mut x1, mut y1) = (0f64, 0f64);
    for (_, x, y) in points {
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    let x1 = (x1 * 1.25).max(1e-3);
    #[allow(clippy::manual_clamp)] // a NaN maximum gives 0.05, where clamp would keep the NaN
    let y1 = (y1 * 1.15).max(0.05).min(1.0);
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    png(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..x1, 0f64..y1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .x_label_formatter(&|v| tick_label(*v, x1))
            .y_label_formatter(&|v| tick_label(*v, y1))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (label, x, y)) in points.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let point = EmptyElement::at((*x, *y))
                + Circle::new((0, 0), 6, color.filled())
                + Text::new(
                    label.clone(),
                    (10, -18),
                    ("sans-serif", 16).into_font().color(&color),
                );
            chart
                .draw_series(std::iter::once(point))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}
