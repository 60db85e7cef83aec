use super::*;

/// Cases generated once by `scripts/gen_timestamp_cases.py` with CPython.
const PYTHON_CASES: &str = include_str!("python_cases.tsv");

fn python_cases() -> impl Iterator<Item = (&'static str, i64, &'static str)> {
    PYTHON_CASES
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let mut cols = line.split('\t');
            let input = cols.next().expect("input column");
            let micros = cols.next().expect("micros column").parse().expect("micros");
            let repr = cols.next().expect("repr column");
            (input, micros, repr)
        })
}

/// Parsing gives Python's microseconds, and `as_secs_f64` Python's `datetime.timestamp()`
/// bit for bit (the value of the API's `X-Flagsmith-Document-Updated-At` header). What SDKs
/// are sent is no longer that float (issue 14): the largest float not above the exact time,
/// which is Python's where Python's is not above it, and the float just below otherwise.
#[test]
fn iso_strings_parse_as_python_does_and_render_not_after_the_exact_time() {
    let mut count = 0;
    let mut stepped_down = 0;
    for (input, micros, repr) in python_cases() {
        let ts = parse_iso8601(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(ts.micros(), micros, "{input}");
        let python: f64 = repr.parse().expect("python repr");
        assert_eq!(ts.as_secs_f64().to_bits(), python.to_bits(), "{input}");
        let rendered = ts.to_string();
        assert!(
            rendered.contains('.') && !rendered.contains('e'),
            "{input}: {rendered} is not a plain decimal"
        );
        let sent: f64 = rendered.parse().expect("rendered");
        assert_eq!(sent, ts.as_secs_f64_not_after(), "{input}: {rendered}");
        assert_eq!(
            parse_decimal_seconds(&rendered),
            Ok(ts),
            "{input}: {rendered}"
        );
        if exceeds(python, micros) {
            // Python's float is above the exact time: the float just below is sent.
            assert_eq!(sent.to_bits(), python.to_bits() - 1, "{input}: {rendered}");
            stepped_down += 1;
        } else {
            assert_eq!(sent.to_bits(), python.to_bits(), "{input}: {rendered}");
            // Python switches to exponent notation below 1e-4; we never do (Flutter wants
            // a plain decimal), so compare the text only where Python prints one.
            if !repr.contains('e') {
                assert_eq!(rendered, repr, "{input}");
            }
        }
        count += 1;
    }
    assert!(count > 300, "only {count} cases read");
    // Both kinds occur among CPython's cases, so both branches were checked.
    assert!(
        stepped_down > 50 && stepped_down < count - 50,
        "{stepped_down} of {count}"
    );
}

#[test]
fn json_bodies_accept_strings_and_numbers() {
    let cases: &[(&str, i64)] = &[
        (
            r#"{"updated_at": "2025-07-14T13:49:43.123456+00:00"}"#,
            1_752_500_983_123_456,
        ),
        (r#"{"updated_at":123}"#, 123_000_000),
        (r#"{"updated_at":0}"#, 0),
        (r#"{"updated_at":-0}"#, 0),
        (r#"{"updated_at":1735229888.76}"#, 1_735_229_888_760_000),
        (r#"{"updated_at":1.73522988876e9}"#, 1_735_229_888_760_000),
        (
            r#"{"updated_at":1735229888.7600004}"#,
            1_735_229_888_760_000,
        ),
        (
            r#"{"updated_at":1735229888.7600006}"#,
            1_735_229_888_760_001,
        ),
        // Half a microsecond rounds to even, as Python's datetime.fromtimestamp does.
        (r#"{"updated_at":0.0000005}"#, 0),
        (r#"{"updated_at":0.0000015}"#, 2),
        (r#"{"updated_at":0.00000150001}"#, 2),
        (r#"{"updated_at":1E-9}"#, 0),
        // The first digit is the one at the half-microsecond position: it alone rounds.
        (r#"{"updated_at":6e-7}"#, 1),
        (r#"{"updated_at":5e-7}"#, 0),
        (r#"{"updated_at":5.1e-7}"#, 1),
        (
            r#"{"updated_at":"2025-07-14T13:49:43Z","other":[1,2]}"#,
            1_752_500_983_000_000,
        ),
        (
            r#"{"updated_at":"2025-07-14T13:49:43\u005a"}"#,
            1_752_500_983_000_000,
        ),
    ];
    for (body, micros) in cases {
        let ts =
            Timestamp::from_update_json(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(ts.micros(), *micros, "{body}");
    }
}

#[test]
fn json_bodies_reject_what_is_not_a_timestamp() {
    let cases: &[(&str, TimestampError)] = &[
        ("", TimestampError::Json(String::new())),
        ("{", TimestampError::Json(String::new())),
        ("[]", TimestampError::Json(String::new())),
        // serde's derived struct parsing takes an array as the struct's fields in order.
        ("[1]", TimestampError::NotAnObject),
        (" [\"2025-07-14T13:49:43Z\"]", TimestampError::NotAnObject),
        ("{}", TimestampError::Missing),
        (r#"{"updated_at":null}"#, TimestampError::Missing),
        (r#"{"updated_at":true}"#, TimestampError::WrongType),
        (r#"{"updated_at":{}}"#, TimestampError::WrongType),
        (r#"{"updated_at":-1}"#, TimestampError::OutOfRange),
        (r#"{"updated_at":1e300}"#, TimestampError::OutOfRange),
        (
            r#"{"updated_at":9007199254.740993}"#,
            TimestampError::OutOfRange,
        ),
        (r#"{"updated_at":"yesterday"}"#, TimestampError::Iso("")),
        (r#"{"updated_at":""}"#, TimestampError::Iso("")),
    ];
    for (body, want) in cases {
        let got = Timestamp::from_update_json(body.as_bytes()).expect_err(body);
        assert_eq!(
            std::mem::discriminant(&got),
            std::mem::discriminant(want),
            "{body}: {got}"
        );
    }
}

/// The parser is public and reads texts that did not pass through a JSON parser.
#[test]
fn decimal_seconds_with_two_points_are_refused() {
    for input in ["1.2.3", "1..2", "1735229888.76.5"] {
        assert_eq!(
            parse_decimal_seconds(input),
            Err(TimestampError::Number),
            "{input}"
        );
    }
}

#[test]
fn iso_accepts_the_last_day_of_each_month() {
    for (input, micros) in [
        ("2025-01-31", 1_738_281_600_000_000),
        ("2025-04-30", 1_745_971_200_000_000),
        ("2025-06-30", 1_751_241_600_000_000),
        ("2025-09-30", 1_759_190_400_000_000),
        ("2025-11-30", 1_764_460_800_000_000),
        ("2025-12-31", 1_767_139_200_000_000),
        ("2024-02-29", 1_709_164_800_000_000),
    ] {
        assert_eq!(
            parse_iso8601(input).map(Timestamp::micros),
            Ok(micros),
            "{input}"
        );
    }
}

#[test]
fn iso_rejects_invalid_dates_and_times() {
    for input in [
        "2025-13-01",
        "2025-02-29",
        "2024-02-30",
        "2025-04-31",
        "2025-06-31",
        "2025-09-31",
        "2025-11-31",
        "2025-07-14T24:00:00",
        "2025-07-14T13:60:00",
        "2025-07-14T13:49:60",
        "2025-07-14T13:49:43.",
        "2025-07-14T13:49:43+25:00",
        "2025-07-14T13:49:43z",
        "2025-07-14T13:49:43Zjunk",
        "2025-07-14X13:49:43",
        "25-07-14",
        "1969-12-31T23:59:59Z",
        "2025-07-14T13:49:43 +00:00",
    ] {
        assert!(parse_iso8601(input).is_err(), "{input} was accepted");
    }
}

#[test]
fn render_always_has_a_decimal_point() {
    for (micros, want) in [
        (0, "0.0"),
        (1, "0.000001"),
        (123_000_000, "123.0"),
        // 1735229888.76 as a float is 1735229888.7599999904...: below, sent as it is.
        (1_735_229_888_760_000, "1735229888.76"),
        // 1752500983.123456 as a float is 1752500983.1234560013...: above the exact time,
        // so the float below (…1234557629) is sent, in its shortest text.
        (1_752_500_983_123_456, "1752500983.1234558"),
        // From 2038 floats are 2^-21 s apart: the float below's shortest text
        // (2147483648.0000405) would read back as 2147483648000040 µs, one too few.
        // 2147483648.0000407 lies in that float's rounding interval and reads back right.
        (2_147_483_648_000_041, "2147483648.0000407"),
        (MAX_MICROS, "9007199254.740992"),
    ] {
        let ts = Timestamp::from_micros(micros).expect("in range");
        assert_eq!(ts.to_string(), want, "{micros}");
    }
}

mod properties {
    use super::super::*;
    use proptest::prelude::*;

    /// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm), written
    /// independently of the parser's inverse so that the two check each other.
    fn civil_from_days(days: i64) -> (i64, u32, u32) {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        (year, month, day)
    }

    /// Up to 2100: there `micros / 1e6` still tells every microsecond apart.
    const YEAR_2100: i64 = 4_102_444_800_000_000;
    /// 2^33 s, in 2242.
    const YEAR_2242: i64 = (1 << 33) * 1_000_000;

    proptest! {
        #[test]
        fn iso_strings_in_any_offset_and_precision_parse_back(
            micros in 0i64..YEAR_2100,
            offset_minutes in -(23 * 60 + 59)..(23 * 60 + 59i64),
            digits in 0usize..=9,
            zulu in any::<bool>(),
        ) {
            let offset_minutes = if zulu { 0 } else { offset_minutes };
            let local = micros + offset_minutes * 60_000_000;
            prop_assume!(local >= 0);
            let (secs, frac) = (local.div_euclid(1_000_000), local.rem_euclid(1_000_000));
            let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
            let tod = secs.rem_euclid(86_400);
            let mut text = format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
                tod / 3600,
                tod / 60 % 60,
                tod % 60
            );
            if digits > 0 {
                let nine = format!("{frac:06}000");
                text.push('.');
                text.push_str(&nine[..digits]);
            }
            if zulu {
                text.push('Z');
            } else {
                let sign = if offset_minutes < 0 { '-' } else { '+' };
                let abs = offset_minutes.abs();
                text.push_str(&format!("{sign}{:02}:{:02}", abs / 60, abs % 60));
            }
            // Fewer than six digits drop the rest of the fraction; more are truncated.
            let kept = if digits >= 6 { frac } else {
                let unit = 10i64.pow(6 - digits as u32);
                frac / unit * unit
            };
            let expected = micros - frac + kept;
            prop_assert_eq!(parse_iso8601(&text).map(Timestamp::micros), Ok(expected), "{}", text);
        }

        /// Stored updates are read back from their rendering: it must give the same
        /// microseconds, up to 2242 (from 2^33 s floats are 2 µs apart).
        #[test]
        fn rendering_then_parsing_gives_the_same_instant(micros in 0i64..YEAR_2242) {
            let ts = Timestamp::from_micros(micros).expect("in range");
            let text = ts.to_string();
            prop_assert!(text.contains('.') && !text.contains('e'));
            prop_assert_eq!(parse_decimal_seconds(&text), Ok(ts), "{}", text);
            let sent: f64 = text.parse().expect("a number");
            prop_assert_eq!(sent, ts.as_secs_f64_not_after(), "{}", text);
            prop_assert!(!exceeds(sent, micros), "{} is after {} µs", text, micros);
        }

        #[test]
        fn no_input_makes_the_parsers_panic(text in ".{0,64}", bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_iso8601(&text);
            let _ = parse_decimal_seconds(&text);
            let _ = Timestamp::from_update_json(&bytes);
            let _ = Timestamp::from_update_json(format!("{{\"updated_at\": \"{text}\"}}").as_bytes());
            let _ = Timestamp::from_update_json(format!("{{\"updated_at\": {text}}}").as_bytes());
        }

        #[test]
        fn iso_like_noise_never_panics(text in "[0-9T:.,+Z -]{0,40}") {
            let _ = parse_iso8601(&text);
        }
    }
}
