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

#[test]
fn iso_strings_match_python_bit_for_bit() {
    let mut count = 0;
    for (input, micros, repr) in python_cases() {
        let ts = parse_iso8601(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(ts.micros(), micros, "{input}");
        let python: f64 = repr.parse().expect("python repr");
        assert_eq!(ts.as_secs_f64().to_bits(), python.to_bits(), "{input}");
        let rendered = ts.to_string();
        assert!(
            rendered.contains('.'),
            "{input}: {rendered} lacks a decimal point"
        );
        assert_eq!(
            rendered.parse::<f64>().expect("rendered").to_bits(),
            python.to_bits(),
            "{input}: {rendered}"
        );
        // Python switches to exponent notation below 1e-4; we never do (Flutter wants a
        // plain decimal), so compare the text only where Python prints a plain decimal.
        if !repr.contains('e') {
            assert_eq!(rendered, repr, "{input}");
        }
        count += 1;
    }
    assert!(count > 300, "only {count} cases read");
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

#[test]
fn iso_rejects_invalid_dates_and_times() {
    for input in [
        "2025-13-01",
        "2025-02-29",
        "2024-02-30",
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
        (1_735_229_888_760_000, "1735229888.76"),
        (1_752_500_983_123_456, "1752500983.123456"),
        (MAX_MICROS, "9007199254.740992"),
    ] {
        assert_eq!(
            Timestamp::from_micros(micros)
                .expect("in range")
                .to_string(),
            want
        );
    }
}
