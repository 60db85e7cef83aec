//! A log-linear latency histogram (about 1.6% resolution) that merges by addition, so
//! worker processes can send theirs to the coordinator instead of every sample.

use serde::{Deserialize, Serialize};

const LINEAR: u64 = 128;
const SUB_BITS: u32 = 6;
const BUCKETS: usize = 128 + 58 * 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Histogram {
    /// Sparse on the wire: (bucket, count) pairs.
    buckets: Vec<(u16, u64)>,
    #[serde(skip)]
    dense: Vec<u64>,
    pub count: u64,
    pub max: u64,
    pub min: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: Vec::new(),
            dense: vec![0; BUCKETS],
            count: 0,
            max: 0,
            min: u64::MAX,
        }
    }
}

fn index(value: u64) -> usize {
    if value < LINEAR {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros();
    let mantissa = (value >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (LINEAR + u64::from(exp - 7) * 64 + mantissa) as usize
}

/// The middle of a bucket's range.
fn value_of(index: usize) -> u64 {
    let index = index as u64;
    if index < LINEAR {
        return index;
    }
    let exp = (index - LINEAR) / 64 + 7;
    let mantissa = (index - LINEAR) % 64;
    let low = (64 + mantissa) << (exp - SUB_BITS as u64);
    let width = 1u64 << (exp - SUB_BITS as u64);
    low + width / 2
}

impl Histogram {
    pub fn record(&mut self, value: u64) {
        if self.dense.is_empty() {
            self.dense = vec![0; BUCKETS];
        }
        self.dense[index(value).min(BUCKETS - 1)] += 1;
        self.count += 1;
        self.max = self.max.max(value);
        self.min = self.min.min(value);
    }

    /// Prepares the sparse form for sending.
    pub fn pack(&mut self) {
        self.buckets = self
            .dense
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (i as u16, *c))
            .collect();
    }

    pub fn merge(&mut self, other: &Histogram) {
        if self.dense.is_empty() {
            self.dense = vec![0; BUCKETS];
        }
        for &(i, c) in &other.buckets {
            self.dense[usize::from(i)] += c;
        }
        if other.buckets.is_empty() {
            for (i, c) in other.dense.iter().enumerate() {
                self.dense[i] += c;
            }
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
        self.min = self.min.min(other.min);
    }

    /// The value at quantile `q` (0..=1); the exact maximum for 1.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        if q >= 1.0 {
            return self.max;
        }
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.dense.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value_of(i).min(self.max).max(self.min);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_two_percent() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), 100_000);
        let mut packed = h.clone();
        packed.pack();
        let mut merged = Histogram::default();
        merged.merge(&packed);
        merged.merge(&packed);
        assert_eq!(merged.count, 200_000);
        assert_eq!(merged.quantile(0.5), h.quantile(0.5));
    }
}
