//! Median and spread of a set of samples.

use serde::Serialize;

/// What a table cell and the JSON say about one variant's samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// (max − min) / median: how far apart the runs were, relative to the median.
    pub spread: f64,
}

impl Summary {
    /// None for an empty set or one holding a NaN.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let (min, max) = (sorted[0], sorted[n - 1]);
        let spread = if median == 0.0 {
            0.0
        } else {
            (max - min) / median.abs()
        };
        Some(Summary {
            median,
            min,
            max,
            spread,
        })
    }
}

/// `value / baseline`, or None when the baseline is zero.
pub fn ratio(value: f64, baseline: f64) -> Option<f64> {
    (baseline != 0.0).then(|| value / baseline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(Summary::of(&[3.0, 1.0, 2.0]).unwrap().median, 2.0);
        assert_eq!(Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
        assert_eq!(Summary::of(&[7.0]).unwrap().median, 7.0);
    }

    #[test]
    fn spread_is_range_over_median() {
        let s = Summary::of(&[9.0, 10.0, 12.0]).unwrap();
        assert_eq!((s.min, s.max), (9.0, 12.0));
        assert!((s.spread - 0.3).abs() < 1e-12);
        assert_eq!(Summary::of(&[0.0, 0.0]).unwrap().spread, 0.0);
    }

    #[test]
    fn empty_or_nan_has_no_summary() {
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn ratio_against_zero_is_none() {
        assert_eq!(ratio(3.0, 1.5), Some(2.0));
        assert_eq!(ratio(3.0, 0.0), None);
    }
}
