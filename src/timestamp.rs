//! Update timestamps: parsing what Flagsmith sends, and rendering what SDKs compare.
//!
//! SDKs compare the `updated_at` they receive with the `X-Flagsmith-Document-Updated-At`
//! header that Flagsmith's API computes with Python's `datetime.timestamp()`. Any difference
//! in the last bit makes every SDK refetch its flags on every event, so a timestamp is kept
//! as whole microseconds (what a Python `datetime` holds) and turned into seconds exactly as
//! Python does: `microseconds / 1e6`, one correctly rounded division.

use std::fmt;

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

/// The largest timestamp we accept, in microseconds: 2^53, so that the microsecond count is
/// exactly representable as an `f64` and `micros / 1e6` is the single correctly rounded
/// division that Python's `int / int` performs. 2^53 µs is in the year 2255.
pub const MAX_MICROS: i64 = 1 << 53;

/// An instant in whole microseconds since the Unix epoch, never before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

/// Why a timestamp was refused. The text is shown to the caller of `queue-change`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TimestampError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("body must be a JSON object, like {{\"updated_at\": \"2025-07-14T13:49:43+00:00\"}}")]
    NotAnObject,
    #[error("body must be a JSON object with an \"updated_at\" field")]
    Missing,
    #[error("\"updated_at\" must be an ISO-8601 string or a number of Unix seconds")]
    WrongType,
    #[error("\"updated_at\" is not an ISO-8601 date-time: {0}")]
    Iso(&'static str),
    #[error("\"updated_at\" is not a valid number")]
    Number,
    #[error("\"updated_at\" is out of range (1970-01-01 to 2255)")]
    OutOfRange,
}

impl Timestamp {
    pub fn from_micros(micros: i64) -> Result<Self, TimestampError> {
        if (0..=MAX_MICROS).contains(&micros) {
            Ok(Self(micros))
        } else {
            Err(TimestampError::OutOfRange)
        }
    }

    pub fn micros(self) -> i64 {
        self.0
    }

    /// Seconds since the epoch, bit for bit what Python's `datetime.timestamp()` returns.
    pub fn as_secs_f64(self) -> f64 {
        // Both operands are exact in f64 (micros <= 2^53), so this is one correctly rounded
        // division, as Python's true division of two ints is.
        self.0 as f64 / 1e6
    }

    /// Parses the body of a `queue-change` request (or a stored NATS message, which uses the
    /// same shape): a JSON object whose `updated_at` is an ISO-8601 string or a number.
    pub fn from_update_json(body: &[u8]) -> Result<Self, TimestampError> {
        #[derive(Deserialize)]
        struct Body<'a> {
            #[serde(borrow)]
            updated_at: Option<&'a RawValue>,
        }
        let parsed: Body<'_> =
            serde_json::from_slice(body).map_err(|e| TimestampError::Json(e.to_string()))?;
        // serde's derived struct parsing also takes a JSON array (`[1]` as `updated_at: 1`);
        // valid JSON that starts with `{` is an object.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(TimestampError::NotAnObject);
        }
        let raw = parsed.updated_at.ok_or(TimestampError::Missing)?.get();
        match raw.as_bytes().first() {
            Some(b'"') => {
                let text: String =
                    serde_json::from_str(raw).map_err(|e| TimestampError::Json(e.to_string()))?;
                parse_iso8601(&text)
            }
            Some(b'-' | b'0'..=b'9') => parse_decimal_seconds(raw),
            _ => Err(TimestampError::WrongType),
        }
    }
}

/// Renders the timestamp as a JSON number that always has a decimal point: Flutter's SDK
/// ignores an integer literal. Rust's shortest round-trip formatting gives the same digits
/// as Python's `repr(float)` and never uses an exponent for values in our range.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.as_secs_f64();
        if self.0 % 1_000_000 == 0 {
            write!(f, "{secs}.0")
        } else {
            write!(f, "{secs}")
        }
    }
}

/// Parses a JSON number literal of Unix seconds, rounding to whole microseconds half to
/// even (as Python's `datetime.fromtimestamp` rounds). Works on the decimal text, so that
/// `1735229888.76` becomes exactly 1735229888760000 µs.
pub fn parse_decimal_seconds(literal: &str) -> Result<Timestamp, TimestampError> {
    let bytes = literal.as_bytes();
    let (negative, rest) = match bytes.first() {
        Some(b'-') => (true, &bytes[1..]),
        _ => (false, bytes),
    };
    let mut mantissa: Vec<u8> = Vec::with_capacity(rest.len());
    let mut point: Option<usize> = None;
    let mut exponent: i64 = 0;
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            c @ b'0'..=b'9' => mantissa.push(c - b'0'),
            b'.' if point.is_none() => point = Some(mantissa.len()),
            b'e' | b'E' => {
                let exp_text =
                    std::str::from_utf8(&rest[i + 1..]).map_err(|_| TimestampError::Number)?;
                exponent = exp_text
                    .parse::<i64>()
                    .map_err(|_| TimestampError::Number)?;
                break;
            }
            _ => return Err(TimestampError::Number),
        }
        i += 1;
    }
    if mantissa.is_empty() {
        return Err(TimestampError::Number);
    }
    if negative && mantissa.iter().any(|&d| d != 0) {
        return Err(TimestampError::OutOfRange);
    }
    // The value is 0.mantissa × 10^(int_digits + exponent); we want it × 10^6.
    let int_digits = point.unwrap_or(mantissa.len()) as i64;
    let shift = int_digits
        .checked_add(exponent)
        .and_then(|s| s.checked_add(6))
        .ok_or(TimestampError::OutOfRange)?;
    let mut micros: i64 = 0;
    let mut first_dropped: u8 = 0;
    let mut dropped_rest_nonzero = false;
    for (idx, &digit) in mantissa.iter().enumerate() {
        if (idx as i64) < shift {
            micros = micros
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(digit)))
                .filter(|m| *m <= MAX_MICROS)
                .ok_or(TimestampError::OutOfRange)?;
        } else if idx as i64 == shift {
            first_dropped = digit;
        } else if digit != 0 {
            dropped_rest_nonzero = true;
        }
    }
    // Digits the mantissa does not have are zeros up to the microsecond position.
    let missing = shift - mantissa.len() as i64;
    if missing > 0 && micros != 0 {
        for _ in 0..missing {
            micros = micros
                .checked_mul(10)
                .filter(|m| *m <= MAX_MICROS)
                .ok_or(TimestampError::OutOfRange)?;
        }
    }
    // A shift below zero means every digit sits below the half-microsecond position.
    if shift < 0 {
        first_dropped = 0;
    }
    let round_up =
        first_dropped > 5 || (first_dropped == 5 && (dropped_rest_nonzero || micros % 2 == 1));
    if round_up {
        micros += 1;
    }
    Timestamp::from_micros(micros)
}

/// Parses the ISO-8601 forms Python's `datetime.isoformat()` writes and
/// `datetime.fromisoformat()` reads back: `YYYY-MM-DD`, then optionally `T` (or a space)
/// and `HH[:MM[:SS[.ffffff]]]`, then optionally `Z` or `±HH[:MM]`. More than six fraction
/// digits are truncated, as Python does. No offset means UTC.
pub fn parse_iso8601(text: &str) -> Result<Timestamp, TimestampError> {
    let mut cur = Cursor(text.as_bytes());
    let year = cur
        .digits(4)
        .ok_or(TimestampError::Iso("expected a 4-digit year"))?;
    cur.expect(b'-')
        .ok_or(TimestampError::Iso("expected '-' after the year"))?;
    let month = cur
        .digits(2)
        .ok_or(TimestampError::Iso("expected a 2-digit month"))?;
    cur.expect(b'-')
        .ok_or(TimestampError::Iso("expected '-' after the month"))?;
    let day = cur
        .digits(2)
        .ok_or(TimestampError::Iso("expected a 2-digit day"))?;
    if !(1..=12).contains(&month) {
        return Err(TimestampError::Iso("month must be 01 to 12"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(TimestampError::Iso("day is not in the month"));
    }
    let (mut hour, mut minute, mut second, mut micros) = (0, 0, 0, 0);
    let mut offset_secs: i64 = 0;
    if !cur.is_empty() {
        match cur.next() {
            Some(b'T' | b't' | b' ') => {}
            _ => return Err(TimestampError::Iso("expected 'T' between date and time")),
        }
        hour = cur
            .digits(2)
            .ok_or(TimestampError::Iso("expected a 2-digit hour"))?;
        if cur.expect(b':').is_some() {
            minute = cur
                .digits(2)
                .ok_or(TimestampError::Iso("expected 2-digit minutes"))?;
            if cur.expect(b':').is_some() {
                second = cur
                    .digits(2)
                    .ok_or(TimestampError::Iso("expected 2-digit seconds"))?;
                if cur.expect(b'.').or_else(|| cur.expect(b',')).is_some() {
                    micros = cur.fraction_micros().ok_or(TimestampError::Iso(
                        "expected digits after the decimal point",
                    ))?;
                }
            }
        }
        if hour > 23 {
            return Err(TimestampError::Iso("hour must be 00 to 23"));
        }
        if minute > 59 {
            return Err(TimestampError::Iso("minutes must be 00 to 59"));
        }
        if second > 59 {
            return Err(TimestampError::Iso("seconds must be 00 to 59"));
        }
        match cur.next() {
            None => {}
            Some(b'Z') => {}
            Some(sign @ (b'+' | b'-')) => {
                let oh = cur
                    .digits(2)
                    .ok_or(TimestampError::Iso("expected a 2-digit offset hour"))?;
                cur.expect(b':');
                let om = if cur.is_empty() {
                    0
                } else {
                    cur.digits(2)
                        .ok_or(TimestampError::Iso("expected 2-digit offset minutes"))?
                };
                if oh > 23 || om > 59 {
                    return Err(TimestampError::Iso("offset out of range"));
                }
                offset_secs = (oh * 3600 + om * 60) as i64;
                if sign == b'-' {
                    offset_secs = -offset_secs;
                }
            }
            Some(_) => return Err(TimestampError::Iso("unexpected character after the time")),
        }
        if !cur.is_empty() {
            return Err(TimestampError::Iso("unexpected characters at the end"));
        }
    }
    let days = days_from_civil(year as i64, month, day);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64 - offset_secs;
    let total = secs
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(micros as i64))
        .ok_or(TimestampError::OutOfRange)?;
    Timestamp::from_micros(total)
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn next(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        if self.0.first() == Some(&byte) {
            self.0 = &self.0[1..];
            Some(())
        } else {
            None
        }
    }

    fn digits(&mut self, count: usize) -> Option<u32> {
        let head = self.0.get(..count)?;
        let mut value = 0u32;
        for &b in head {
            if !b.is_ascii_digit() {
                return None;
            }
            value = value * 10 + u32::from(b - b'0');
        }
        self.0 = &self.0[count..];
        Some(value)
    }

    /// One or more digits; the first six are microseconds, the rest are dropped.
    fn fraction_micros(&mut self) -> Option<u32> {
        let len = self.0.iter().take_while(|b| b.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        let mut micros = 0u32;
        for i in 0..6 {
            let digit = self.0.get(i).filter(|_| i < len).map_or(0, |b| b - b'0');
            micros = micros * 10 + u32::from(digit);
        }
        self.0 = &self.0[len..];
        Some(micros)
    }
}

fn is_leap(year: u32) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
