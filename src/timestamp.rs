//! Update timestamps: parsing what Flagsmith sends, and rendering what SDKs compare.
//!
//! A timestamp is kept as whole microseconds, what a Python `datetime` (and so Flagsmith's
//! API, its environment document and its `X-Flagsmith-Document-Updated-At` header) holds.
//! The `updated_at` written to SDKs is chosen so that no SDK reads an update it already
//! holds as newer, and every SDK reads one a microsecond newer as newer (issue 14). SDKs
//! compare it in different ways: Go turns the float into (seconds, nanoseconds) by
//! truncation and compares with the document's exact microseconds; Python rounds it to a
//! microsecond; JavaScript, iOS and Android compare it with the header's correctly
//! rounded float; Ruby with the last one it got; Flutter with the device's clock. The
//! correctly rounded float (`micros / 1e6`, what Python's `datetime.timestamp()` gives)
//! lies above the exact time for about half of all timestamps, and Go then reads every
//! equal update as newer. The largest float not above the exact time satisfies them all
//! (`tests/sdk_arithmetic.rs` proves it per SDK, up to 2106).

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

/// Renders the timestamp as a JSON number that always has a decimal point (Flutter's SDK
/// ignores an integer literal) and never an exponent: a decimal text whose nearest float is
/// `as_secs_f64_not_after()`, so that no SDK reads it as later than the exact time (see the
/// module's comment), and that `parse_decimal_seconds` reads back as the same microseconds
/// (stored updates are read back that way). The shortest such text where there is one,
/// which is the float's shortest round-trip text for every timestamp up to 2038.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl Timestamp {
    /// Seconds since the epoch, correctly rounded: bit for bit what Python's
    /// `datetime.timestamp()` returns, and so the value of the `X-Flagsmith-Document-Updated-At`
    /// header Flagsmith's API sends with the same instant. Not what SDKs are sent: see
    /// `as_secs_f64_not_after`.
    pub fn as_secs_f64(self) -> f64 {
        // Both operands are exact in f64 (micros <= 2^53), so this is one correctly rounded
        // division, as Python's true division of two ints is.
        self.0 as f64 / 1e6
    }

    /// The largest float not above the exact time `micros / 10^6`: the correctly rounded
    /// value, or the float just below it when that one lies above the exact time.
    pub fn as_secs_f64_not_after(self) -> f64 {
        let rounded = self.as_secs_f64();
        if exceeds(rounded, self.0) {
            // Positive and finite: the next float down is the one whose bits are one less.
            f64::from_bits(rounded.to_bits() - 1)
        } else {
            rounded
        }
    }

    fn render(self) -> String {
        let value = self.as_secs_f64_not_after();
        let reads_back = |text: &str| {
            text.parse::<f64>().ok() == Some(value) && parse_decimal_seconds(text) == Ok(self)
        };
        let shortest = with_point(format!("{value}"));
        if reads_back(&shortest) {
            return shortest;
        }
        // The shortest text of the float lies more than half a microsecond below the exact
        // time (from 2038 on, where floats are 2^-21 s apart): take, with as few digits as
        // will do, the largest decimal still below the midpoint to the next float up, which
        // the float's own rounding interval holds and which lies closer to the exact time.
        (7..=20)
            .map(|digits| with_point(below_midpoint(value, digits)))
            .find(|text| reads_back(text))
            // Past 2242 floats are 2 µs apart and no text is both: keep the exact value.
            .unwrap_or_else(|| with_point(format!("{}", self.as_secs_f64())))
    }
}

/// Whether the float `value` (zero, or at least 10^-6, from `micros / 1e6`) is above
/// `micros / 10^6`, computed exactly.
fn exceeds(value: f64, micros: i64) -> bool {
    if value == 0.0 {
        return false;
    }
    let (mantissa, exponent) = decompose(value);
    // value = mantissa * 2^exponent; compare mantissa * 2^exponent * 10^6 with micros.
    let scaled = u128::from(mantissa) * 1_000_000;
    let micros = micros.unsigned_abs() as u128;
    if exponent >= 0 {
        (scaled << exponent) > micros
    } else {
        scaled > (micros << -exponent)
    }
}

/// `value` (positive, finite, at most 2^33) as mantissa * 2^exponent.
fn decompose(value: f64) -> (u64, i32) {
    let bits = value.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1 << 52) - 1);
    if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1 << 52), biased - 1075)
    }
}

/// The largest decimal with `digits` fraction digits strictly below the midpoint between
/// `value` and the next float up.
fn below_midpoint(value: f64, digits: u32) -> String {
    let (mantissa, exponent) = decompose(value);
    // midpoint = (2 * mantissa + 1) * 2^(exponent - 1); values here are below 2^34, so
    // exponent - 1 < 0.
    let shift = (1 - exponent) as u32;
    let scale = 10u128.pow(digits);
    let numerator = (2 * u128::from(mantissa) + 1) * scale;
    let quotient = (numerator >> shift) - u128::from(numerator.trailing_zeros() >= shift);
    let whole = quotient / scale;
    let fraction = quotient % scale;
    let text = format!("{whole}.{fraction:0width$}", width = digits as usize);
    text.trim_end_matches('0').to_owned()
}

fn with_point(mut text: String) -> String {
    if !text.contains('.') {
        text.push_str(".0");
    }
    if text.ends_with('.') {
        text.push('0');
    }
    text
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
