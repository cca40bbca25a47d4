//! Loss curves as self-contained SVG (plotters): the curve every run draws (training loss and
//! cross-entropy per step, held-out cross-entropy where it evaluated), and the overlaid curves of
//! a sweep's report.

use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("drawing {}: {msg}", path.display())]
pub struct PlotError {
    pub path: PathBuf,
    pub msg: String,
}

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Line,
    /// A thin line, e.g. a percentile around a median.
    Thin,
    Dots,
}

/// One series: a name (none: no legend entry), a colour and (step, value) points.
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

/// Draws panels of series against the step into one SVG, stacked: each panel is
/// (y-axis label, series).
pub fn loss_curve(
    out: &Path,
    title: &str,
    panels: &[(&str, Vec<Series>)],
) -> Result<(), PlotError> {
    let svg = loss_curve_svg(title, panels).map_err(|msg| PlotError {
        path: out.to_owned(),
        msg,
    })?;
    std::fs::write(out, svg).map_err(|e| PlotError {
        path: out.to_owned(),
        msg: e.to_string(),
    })
}

/// The panels of `loss_curve` as SVG text (to inline in HTML).
pub fn loss_curve_svg(title: &str, panels: &[(&str, Vec<Series>)]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 300 * panels.len().max(1) as u32))
            .into_drawing_area();
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            root.fill(&WHITE)?;
            let root = root.titled(title, ("sans-serif", 20))?;
            for (area, (y_desc, series)) in root.split_evenly((panels.len(), 1)).iter().zip(panels)
            {
                draw_panel(area, y_desc, series)?;
            }
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    y_desc: &str,
    series: &[Series],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let finite: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(drawable)
        .collect();
    let x_max = finite.iter().map(|p| p.0).fold(1.0f64, f64::max);
    let y_min = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (y_min, y_max) = if y_min.is_finite() {
        // Relative to the values too, so the range keeps a width at any magnitude.
        let pad = ((y_max - y_min) * 0.05)
            .max(1e-3)
            .max(y_min.abs().max(y_max.abs()) * 1e-3);
        (y_min - pad, y_max + pad)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .draw()?;
    for s in series {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(drawable).collect();
        let color = s.color;
        let drawn = match s.style {
            Style::Dots => {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?
            }
            Style::Line => chart.draw_series(LineSeries::new(pts, color.stroke_width(2)))?,
            Style::Thin => chart.draw_series(LineSeries::new(pts, color.stroke_width(1)))?,
        };
        if !s.name.is_empty() {
            let dots = s.style == Style::Dots;
            drawn.label(s.name.as_str()).legend(move |(x, y)| {
                if dots {
                    Circle::new((x + 10, y), 4, color.filled()).into_dyn()
                } else {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)).into_dyn()
                }
            });
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}

/// Points a chart can hold: finite, steps within 1e15 and values within 1e100 (a diverged
/// run's 1e308 would make the axis range infinite, and plotters never finishes its ticks).
fn drawable(p: &(f64, f64)) -> bool {
    p.0.is_finite() && p.0.abs() <= 1e15 && p.1.is_finite() && p.1.abs() <= 1e100
}

/// Reads `(step, field)` pairs from a JSONL file (missing file: none).
pub fn column(path: &Path, field: &str) -> Vec<(f64, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v[field].as_f64()?)))
        .collect()
}

/// The standard plot of a run directory: `loss.svg` from metrics.jsonl and eval.jsonl.
pub fn plot_run(dir: &Path, title: &str) -> Result<PathBuf, PlotError> {
    let metrics = dir.join("metrics.jsonl");
    let loss = vec![Series {
        name: "training loss (the variant's objective)".into(),
        color: RGBColor(31, 119, 180),
        points: column(&metrics, "loss"),
        style: Style::Line,
    }];
    let ce = vec![
        Series {
            name: "training cross-entropy".into(),
            color: RGBColor(255, 127, 14),
            points: column(&metrics, "ce"),
            style: Style::Line,
        },
        Series {
            name: "held-out cross-entropy".into(),
            color: RGBColor(44, 160, 44),
            points: column(&dir.join("eval.jsonl"), "eval_ce"),
            style: Style::Dots,
        },
    ];
    let out = dir.join("loss.svg");
    loss_curve(&out, title, &[("loss", loss), ("cross-entropy (nats)", ce)])?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metrics a user could have on disk (garbage lines, NaN, a diverged run's 1e308, steps of
    /// 1e300, a single point) draw a chart promptly instead of failing or hanging.
    #[test]
    fn any_metrics_file_draws_promptly() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let cases = [
            "garbage\n{\"step\": 1, \"loss\": \"NaN\"}\n",
            "{\"step\": 1, \"loss\": 0.5, \"ce\": 1.0}\n",
            "{\"step\": 1, \"loss\": 1e308, \"ce\": -1e308}\n{\"step\": 2, \"loss\": -1e308, \"ce\": 1e308}\n",
            "{\"step\": 1e300, \"loss\": 1e100, \"ce\": 1e-300}\n{\"step\": 2, \"loss\": 1e100, \"ce\": 0}\n",
        ];
        for (i, metrics) in cases.iter().enumerate() {
            let d = dir.join(i.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("metrics.jsonl"), metrics).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let run = d.clone();
            std::thread::spawn(move || tx.send(plot_run(&run, "t").map(|_| ()).is_ok()));
            let drawn = rx.recv_timeout(std::time::Duration::from_secs(30));
            assert_eq!(drawn, Ok(true), "case {i}: {metrics}");
            assert!(
                std::fs::read_to_string(d.join("loss.svg"))
                    .unwrap()
                    .contains("<svg")
            );
        }
    }
}
