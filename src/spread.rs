//! Spreading moments that many clients would otherwise share (stream ends, refusal answers,
//! the drain at shutdown), without a random number generator: consecutive serial numbers
//! scattered evenly by a multiplicative hash.

/// A number in [0, 1) for `serial`; another `salt` gives an unrelated scattering.
pub fn scatter(serial: u64, salt: u64) -> f64 {
    let mixed = (serial ^ salt.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_serials_cover_the_interval() {
        let mut seen = [0u32; 10];
        for serial in 0..1000 {
            let x = scatter(serial, 7);
            assert!((0.0..1.0).contains(&x), "{x}");
            seen[(x * 10.0) as usize] += 1;
        }
        // 1,000 draws over ten deciles: each gets about 100, none is empty or crowded.
        assert!(seen.iter().all(|n| (80..=120).contains(n)), "{seen:?}");
        assert_ne!(scatter(1, 0), scatter(1, 1));
    }

    /// Stream ages are `age * (0.9 + 0.2 * scatter(serial, 0xA6E))` (`sse::spread_age`): a
    /// few dozen clients that connect together (consecutive serials) reach both ends of the
    /// ±10 % spread, not one side of it. `tests/stream_age.rs` measures the same through
    /// the service on every path.
    #[test]
    fn a_few_dozen_consecutive_streams_reach_both_ends_of_the_age_spread() {
        for first in [0, 1, 1_000, 123_456_789] {
            let draws: Vec<f64> = (first..first + 40).map(|s| scatter(s, 0xA6E)).collect();
            let min = draws.iter().copied().fold(f64::INFINITY, f64::min);
            let max = draws.iter().copied().fold(0.0, f64::max);
            assert!(min < 0.1 && max > 0.9, "from {first}: {min} .. {max}");
        }
    }
}
