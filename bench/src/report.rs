//! The results: figures with every raw sample, written as a Markdown report (native = 1.00,
//! others as ratios) and as JSON.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::machine::Machine;
use super::stats::{ratio, Summary};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the JSON report")]
    Json(#[source] serde_json::Error),
}

/// How one workload was run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    Process,
    Container,
    Rvmm,
    Qemu,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::Process,
        Variant::Container,
        Variant::Rvmm,
        Variant::Qemu,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Variant::Process => "process",
            Variant::Container => "crun container",
            Variant::Rvmm => "rvmm microVM",
            Variant::Qemu => "QEMU microvm",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Lower,
    Higher,
}

/// One variant's measurements of a figure, or why there are none.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Samples { samples: Vec<f64>, summary: Summary },
    Skipped { reason: String },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub variant: Variant,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// One measured quantity (e.g. start latency to exit), across the variants.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figure {
    pub id: String,
    pub title: String,
    pub unit: String,
    pub better: Better,
    pub rows: Vec<Row>,
}

impl Figure {
    pub fn new(id: &str, title: &str, unit: &str, better: Better) -> Self {
        Figure {
            id: id.into(),
            title: title.into(),
            unit: unit.into(),
            better,
            rows: Vec::new(),
        }
    }

    /// Adds the samples of `variant`; an empty set is recorded as skipped.
    pub fn samples(&mut self, variant: Variant, samples: Vec<f64>) {
        let outcome = match Summary::of(&samples) {
            Some(summary) => Outcome::Samples { samples, summary },
            None => Outcome::Skipped {
                reason: "no sample was taken".into(),
            },
        };
        self.rows.push(Row { variant, outcome });
    }

    pub fn skipped(&mut self, variant: Variant, reason: &str) {
        self.rows.push(Row {
            variant,
            outcome: Outcome::Skipped {
                reason: reason.into(),
            },
        });
    }

    pub fn summary(&self, variant: Variant) -> Option<Summary> {
        self.rows.iter().find_map(|r| match &r.outcome {
            Outcome::Samples { summary, .. } if r.variant == variant => Some(*summary),
            _ => None,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub runs: u32,
    /// The bench's own peak RSS, which a command it started directly would inherit.
    pub bench_peak_rss_mib: f64,
    /// Findings worth a sentence, such as the VMM-only comparison with QEMU.
    pub notes: Vec<String>,
    pub figures: Vec<Figure>,
}

impl Report {
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        let text = serde_json::to_string_pretty(self).map_err(ReportError::Json)?;
        write(path, &text)
    }

    pub fn write_markdown(
        &self,
        path: &Path,
        charts: &[(String, String)],
    ) -> Result<(), ReportError> {
        write(path, &self.markdown(charts))
    }

    /// The report: machine, one table of every figure, notes, skip reasons, chart links.
    pub fn markdown(&self, charts: &[(String, String)]) -> String {
        let mut md = String::from("# rvmm bench\n\n");
        md.push_str(&self.machine.markdown());
        let _ = writeln!(
            md,
            "\nEach cell: the ratio to the plain process (native = 1.00) when there is one, then the \
             median of {} run(s) and, in brackets, the lowest and highest run.\n",
            self.runs
        );
        md.push_str(&table(&self.figures));
        let skips = skip_reasons(&self.figures);
        if !skips.is_empty() {
            md.push_str("\n## Skipped\n\n");
            for (mark, reason) in skips.iter().enumerate() {
                let _ = writeln!(md, "{}. {reason}", mark + 1);
            }
        }
        if !self.notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        if !charts.is_empty() {
            md.push_str("\n## Charts\n\n");
            for (title, file) in charts {
                let _ = writeln!(md, "![{title}]({file})");
            }
        }
        md
    }
}

fn write(path: &Path, text: &str) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|source| ReportError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Distinct skip reasons in order of first appearance; cells refer to them by number.
fn skip_reasons(figures: &[Figure]) -> Vec<String> {
    let mut reasons: Vec<String> = Vec::new();
    for row in figures.iter().flat_map(|f| &f.rows) {
        if let Outcome::Skipped { reason } = &row.outcome {
            if !reasons.contains(reason) {
                reasons.push(reason.clone());
            }
        }
    }
    reasons
}

fn table(figures: &[Figure]) -> String {
    let reasons = skip_reasons(figures);
    let mut md = String::from("| figure | unit | better |");
    for v in Variant::ALL {
        let _ = write!(md, " {} |", v.label());
    }
    md.push_str("\n|---|---|---|");
    md.push_str(&"---|".repeat(Variant::ALL.len()));
    md.push('\n');
    for fig in figures {
        let better = match fig.better {
            Better::Lower => "lower",
            Better::Higher => "higher",
        };
        let _ = write!(md, "| {} | {} | {better} |", fig.title, fig.unit);
        let native = fig.summary(Variant::Process);
        for v in Variant::ALL {
            let _ = write!(md, " {} |", cell(fig, v, native, &reasons));
        }
        md.push('\n');
    }
    md
}

fn cell(fig: &Figure, variant: Variant, native: Option<Summary>, reasons: &[String]) -> String {
    let Some(row) = fig.rows.iter().find(|r| r.variant == variant) else {
        return "–".into();
    };
    match &row.outcome {
        Outcome::Samples { summary: s, .. } => {
            let ratio = native.and_then(|n| ratio(s.median, n.median));
            let prefix = ratio
                .map(|r| format!("{} · ", number(r)))
                .unwrap_or_default();
            format!(
                "{prefix}{} [{}–{}]",
                number(s.median),
                number(s.min),
                number(s.max)
            )
        }
        Outcome::Skipped { reason } => {
            let mark = reasons
                .iter()
                .position(|r| r == reason)
                .map_or(0, |i| i + 1);
            format!("skipped ({mark})")
        }
    }
}

/// Three significant digits, without scientific notation: 1234, 12.3, 1.23, 0.123, 0.000889
/// (a guest's Gbit/s on an emulating KVM must not read as 0.000).
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a > 0.0 {
        let decimals = (2 - a.log10().floor() as i32).max(3) as usize;
        format!("{v:.decimals$}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Machine;

    fn report() -> Report {
        let mut fig = Figure::new("start.exit", "start to exit", "ms", Better::Lower);
        fig.samples(Variant::Process, vec![2.0, 1.0, 3.0]);
        fig.samples(Variant::Rvmm, vec![8.0, 8.0, 9.0]);
        fig.skipped(Variant::Qemu, "qemu-system-x86_64 is not installed");
        fig.samples(Variant::Container, vec![]);
        Report {
            machine: Machine::example(),
            runs: 3,
            bench_peak_rss_mib: 4.5,
            notes: vec!["a note".into()],
            figures: vec![fig],
        }
    }

    #[test]
    fn markdown_holds_ratios_medians_and_skip_reasons() {
        let md = report().markdown(&[("start".into(), "start.exit.svg".into())]);
        assert!(md.contains("| start to exit | ms | lower |"), "{md}");
        assert!(md.contains("1.00 · 2.00 [1.00–3.00]"), "{md}");
        assert!(md.contains("4.00 · 8.00 [8.00–9.00]"), "{md}");
        assert!(md.contains("skipped (2)"), "{md}");
        assert!(
            md.contains("1. qemu-system-x86_64 is not installed"),
            "{md}"
        );
        assert!(md.contains("2. no sample was taken"), "{md}");
        assert!(md.contains("![start](start.exit.svg)"), "{md}");
        assert!(md.contains("- a note"), "{md}");
    }

    #[test]
    fn json_holds_every_sample_and_its_summary() {
        let json = serde_json::to_value(report()).unwrap();
        let rows = &json["figures"][0]["rows"];
        assert_eq!(rows[0]["variant"], "process");
        assert_eq!(
            rows[0]["samples"]["samples"],
            serde_json::json!([2.0, 1.0, 3.0])
        );
        assert_eq!(rows[0]["samples"]["summary"]["median"], 2.0);
        assert_eq!(
            rows[2]["skipped"]["reason"],
            "qemu-system-x86_64 is not installed"
        );
    }

    #[test]
    fn numbers_keep_three_significant_digits() {
        assert_eq!(number(1234.4), "1234");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(1.234), "1.23");
        assert_eq!(number(0.01234), "0.0123");
        assert_eq!(number(0.5), "0.500");
        assert_eq!(number(0.000_888_9), "0.000889");
        assert_eq!(number(0.0), "0");
    }
}
