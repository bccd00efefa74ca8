//! One SVG bar chart per figure: the median of each measured variant with a min–max whisker.

use std::path::Path;

use plotters::prelude::*;

use super::report::{number, Figure, Outcome};

#[derive(Debug, thiserror::Error)]
#[error("cannot draw the chart {0}: {1}")]
pub struct ChartError(String, String);

/// Draws `fig` into `path`; figures without any measured variant are not drawn (Ok(false)).
pub fn draw(fig: &Figure, path: &Path) -> Result<bool, ChartError> {
    let bars: Vec<(&str, f64, f64, f64)> = fig
        .rows
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Samples { summary: s, .. } => {
                Some((r.variant.label(), s.median, s.min, s.max))
            }
            Outcome::Skipped { .. } => None,
        })
        .collect();
    if bars.is_empty() {
        return Ok(false);
    }
    let err = |e: &dyn std::fmt::Display| ChartError(path.display().to_string(), e.to_string());
    let top = bars.iter().map(|b| b.3).fold(0.0, f64::max) * 1.2;
    let top = if top > 0.0 { top } else { 1.0 };
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{} ({})", fig.title, fig.unit), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n, 0.0..top)
        .map_err(|e| err(&e))?;
    let labels: Vec<&str> = bars.iter().map(|b| b.0).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            let centred = (x - x.floor() - 0.5).abs() < 0.01;
            match (centred, labels.get(i)) {
                (true, Some(l)) => l.to_string(),
                _ => String::new(),
            }
        })
        .y_desc(fig.unit.as_str())
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (_, median, min, max)) in bars.iter().enumerate() {
        let x = i as f64;
        chart
            .draw_series([Rectangle::new(
                [(x + 0.2, 0.0), (x + 0.8, *median)],
                BLUE.mix(0.6).filled(),
            )])
            .map_err(|e| err(&e))?;
        chart
            .draw_series([PathElement::new(
                vec![(x + 0.5, *min), (x + 0.5, *max)],
                BLACK.stroke_width(2),
            )])
            .map_err(|e| err(&e))?;
        chart
            .draw_series([Text::new(
                number(*median),
                (x + 0.3, *max + top * 0.03),
                ("sans-serif", 14),
            )])
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Better, Variant};

    #[test]
    fn draws_bars_for_measured_variants_only() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("f.svg");
        let mut fig = Figure::new("start.exit", "start to exit", "ms", Better::Lower);
        fig.samples(Variant::Process, vec![1.0, 2.0]);
        fig.skipped(Variant::Qemu, "absent");
        assert!(draw(&fig, &path).unwrap());
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("process") && !svg.contains("QEMU"),
            "{svg}"
        );

        let mut empty = Figure::new("x", "x", "ms", Better::Lower);
        empty.skipped(Variant::Rvmm, "absent");
        assert!(!draw(&empty, &dir.as_path().join("e.svg")).unwrap());
    }
}
