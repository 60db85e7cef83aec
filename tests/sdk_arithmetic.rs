//! Issue 14: for every SDK, by its own arithmetic (`sdk/mod.rs`, each copied from the SDK's
//! source), the `updated_at` the service writes for an update equal to what the SDK holds
//! is never read as newer, and one a microsecond newer always is. Proved on 100,000 random
//! microsecond timestamps per SDK (2001 to 2106), then end to end: updates posted to the
//! service (in-memory broker and NATS, whose stored payload is read back from the same
//! text) and the event text each stream received fed to every SDK's decision.

mod common;
mod sdk;

use std::process::{Command, Stdio};

use common::*;
use flagsmith_sse::timestamp::Timestamp;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use sdk::*;

/// 2001-09-09 (10^9 s) .. 2106-02-07 (2^32 s). Beyond 2^32 s floats are 2^-20 s apart,
/// more than half a microsecond, and a float can no longer tell every microsecond from the
/// next for the SDKs that compare floats.
const FROM: i64 = 1_000_000_000 * 1_000_000;
const UNTIL: i64 = (1 << 32) * 1_000_000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 100_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The event data the service writes for `micros`.
fn sent(micros: i64) -> String {
    event_data(
        &Timestamp::from_micros(micros)
            .expect("in range")
            .to_string(),
    )
}

/// The event data a correctly rounded float would give (the rendering before issue 14,
/// Python's `repr(micros / 1e6)`).
fn correctly_rounded(micros: i64) -> String {
    event_data(&Document { micros }.header())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn go_refetches_on_newer_never_on_equal(m in FROM..UNTIL) {
        let held = Document { micros: m };
        prop_assert_eq!(go_newer(&sent(m), held), Some(false), "{}", sent(m));
        prop_assert_eq!(go_newer(&sent(m + 1), held), Some(true), "{}", sent(m + 1));
    }

    #[test]
    fn python_refetches_on_newer_never_on_equal(m in FROM..UNTIL) {
        let held = Document { micros: m };
        prop_assert_eq!(python_newer(&sent(m), held), Some(false), "{}", sent(m));
        prop_assert_eq!(python_newer(&sent(m + 1), held), Some(true), "{}", sent(m + 1));
    }

    #[test]
    fn js_refetches_on_newer_never_on_equal(m in FROM..UNTIL) {
        let held = Some(Document { micros: m }.header_f64());
        prop_assert_eq!(js_newer(&sent(m), held), Some(false), "{}", sent(m));
        prop_assert_eq!(js_newer(&sent(m + 1), held), Some(true), "{}", sent(m + 1));
    }

    /// Ruby holds the last `updated_at` it refetched for: the rendering must be strictly
    /// increasing in the microseconds.
    #[test]
    fn ruby_refetches_on_newer_never_on_equal(m in FROM..UNTIL) {
        let held = json_f64(&sent(m)).expect("a number");
        prop_assert_eq!(ruby_newer(&sent(m), held), Some(false), "{}", sent(m));
        prop_assert_eq!(ruby_newer(&sent(m + 1), held), Some(true), "{}", sent(m + 1));
    }

    /// iOS with the baseline its code intends (the header); what it really holds is
    /// `IOS_LAST_UPDATED_AT`, see `ios_holds_zero_and_refetches_on_every_event`.
    #[test]
    fn ios_refetches_on_newer_never_on_equal(m in FROM..UNTIL) {
        let held = ios_intended_baseline(Document { micros: m });
        prop_assert_eq!(ios_newer(&sent(m), held), Some(false), "{}", sent(m));
        prop_assert_eq!(ios_newer(&sent(m + 1), held), Some(true), "{}", sent(m + 1));
    }

    #[test]
    fn android_refetches_on_newer_never_on_equal(m in FROM..UNTIL) {
        let held = Document { micros: m }.header_f64();
        prop_assert_eq!(android_newer(&sent(m), held), Some(false), "{}", sent(m));
        prop_assert_eq!(android_newer(&sent(m + 1), held), Some(true), "{}", sent(m + 1));
    }

    /// Flutter holds the device's clock at its last fetch, in milliseconds. With the clock
    /// right, an update made before (or at) the fetch is not newer, and one a microsecond
    /// after it is.
    #[test]
    fn flutter_refetches_on_newer_never_on_equal(m in FROM..UNTIL, later_ms in 0i64..2_000) {
        let fetched_ms = m.div_euclid(1_000) + i64::from(m % 1_000 != 0) + later_ms;
        let held = Some(flutter_last_get_flags(fetched_ms));
        prop_assert!(!flutter_newer(&sent(m), held), "{} {}", sent(m), fetched_ms);
        let after = fetched_ms * 1_000 + 1;
        prop_assert!(flutter_newer(&sent(after), held), "{} {}", sent(after), fetched_ms);
    }

    /// Every SDK's parser reads the text as a JSON number with a decimal point, which
    /// Flutter needs, and no exponent.
    #[test]
    fn the_text_is_a_plain_decimal_every_parser_reads(m in 0i64..UNTIL) {
        let data = sent(m);
        let literal = updated_at_literal(&data).expect("a number");
        prop_assert!(literal.contains('.') && !literal.contains(['e', 'E']), "{}", data);
        prop_assert!(is_dart_double(&literal));
        prop_assert!(serde_json::from_str::<serde_json::Value>(&data).is_ok());
    }
}

/// The bug issue 14 fixes, kept as a test: with the correctly rounded float (the rendering
/// before it, and still Python's `datetime.timestamp()`), Go reads about half of all equal
/// updates as newer. The property above fails the same way when the rendering is put back.
#[test]
fn go_reads_a_correctly_rounded_float_as_newer_for_about_half_of_all_timestamps() {
    let mut rng = proptest::test_runner::TestRunner::deterministic();
    let strategy = FROM..UNTIL;
    let total = 100_000;
    let mut newer = 0;
    for _ in 0..total {
        let m = strategy.new_tree(&mut rng).expect("a value").current();
        if go_newer(&correctly_rounded(m), Document { micros: m }) == Some(true) {
            newer += 1;
        }
        // The service's rendering of the same instant never is.
        assert_eq!(go_newer(&sent(m), Document { micros: m }), Some(false));
    }
    println!("Go read {newer} of {total} correctly rounded equal updates as newer");
    assert!(
        (total * 2 / 5..total * 3 / 5).contains(&newer),
        "{newer} of {total}"
    );
}

/// iOS at bb8564b4b22e: its baseline is never set, so every event, equal ones included, is
/// read as newer. No rendering can cure that (see README, "SDK compatibility").
#[test]
fn ios_holds_zero_and_refetches_on_every_event() {
    for m in [FROM, 1_752_500_983_123_456, UNTIL - 1] {
        assert_eq!(ios_newer(&sent(m), IOS_LAST_UPDATED_AT), Some(true));
    }
}

/// The Python and JavaScript decisions checked against the real interpreters: CPython's
/// `json.loads` + `datetime.fromtimestamp(f, timezone.utc)` and Node's `JSON.parse` +
/// `parseFloat(header)` + `>`, on the same texts (both are installed for the test suite).
#[test]
fn python_and_node_agree_with_the_emulated_arithmetic() {
    let mut rng = proptest::test_runner::TestRunner::deterministic();
    let strategy = FROM..UNTIL;
    let micros: Vec<i64> = (0..20_000)
        .map(|_| strategy.new_tree(&mut rng).expect("a value").current())
        .collect();
    // Each line: the event data for m, then for m + 1, then the header for m.
    let input: String = micros
        .iter()
        .map(|&m| {
            format!(
                "{}\t{}\t{}\n",
                sent(m),
                sent(m + 1),
                Document { micros: m }.header()
            )
        })
        .collect();
    let python = run(
        "python3",
        &[
            "-c",
            "import sys, json\n\
             from datetime import datetime, timezone\n\
             E = datetime(1970, 1, 1, tzinfo=timezone.utc)\n\
             def us(d):\n\
             \x20   t = datetime.fromtimestamp(json.loads(d)['updated_at'], tz=timezone.utc) - E\n\
             \x20   return (t.days * 86400 + t.seconds) * 1000000 + t.microseconds\n\
             for line in sys.stdin:\n\
             \x20   a, b, h = line.rstrip('\\n').split('\\t')\n\
             \x20   print(us(a), us(b))\n",
        ],
        &input,
    );
    let node = run(
        "node",
        &[
            "-e",
            "const lines = require('fs').readFileSync(0, 'utf8').trim().split('\\n');\n\
             const out = [];\n\
             for (const line of lines) {\n\
               const [a, b, h] = line.split('\\t');\n\
               const timestamp = parseFloat(h);\n\
               const newer = (d) => { const u = JSON.parse(d).updated_at; return !timestamp || u > timestamp; };\n\
               out.push(`${newer(a)} ${newer(b)}`);\n\
             }\n\
             console.log(out.join('\\n'));",
        ],
        &input,
    );
    let (python, node): (Vec<&str>, Vec<&str>) = (python.lines().collect(), node.lines().collect());
    assert_eq!(python.len(), micros.len());
    assert_eq!(node.len(), micros.len());
    for (i, &m) in micros.iter().enumerate() {
        let (a, b) = (sent(m), sent(m + 1));
        let emulated = format!(
            "{} {}",
            python_from_timestamp(json_f64(&a).expect("a")),
            python_from_timestamp(json_f64(&b).expect("b"))
        );
        assert_eq!(python[i], emulated, "CPython on {a} / {b}");
        assert_eq!(python[i], format!("{m} {}", m + 1), "CPython on {a} / {b}");
        let held = Some(Document { micros: m }.header_f64());
        let emulated = format!(
            "{} {}",
            js_newer(&a, held).expect("a"),
            js_newer(&b, held).expect("b")
        );
        assert_eq!(node[i], emulated, "Node on {a} / {b}");
        assert_eq!(node[i], "false true", "Node on {a} / {b}");
    }
}

fn run(program: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().expect("output");
    writer.join().expect("writer").expect("write");
    assert!(output.status.success(), "{program} failed");
    String::from_utf8(output.stdout).expect("utf-8")
}

/// Every SDK's decision on the event text the service really sent, for 300 updates posted
/// as Flagsmith's API posts them: equal to what the SDK holds, not newer; a microsecond
/// newer, newer. Through the in-memory broker and through NATS (which stores the rendered
/// text and reads it back).
async fn every_sdk_decides_right_on_what_the_service_sends(service: &Service) {
    service.wait_ready().await;
    let mut sse = service.subscribe("sdks").await;
    let mut rng = proptest::test_runner::TestRunner::deterministic();
    let step = 1i64..1_000_000_000;
    // From 2026 on, as a user would see them.
    let mut m = 1_780_000_000_000_000i64;
    let mut overshoots = 0;
    for _ in 0..300 {
        m += step.new_tree(&mut rng).expect("a step").current();
        let resp = service.publish("sdks", &format!("\"{}\"", iso(m))).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        let block = sse
            .next_block(10 * SECOND)
            .await
            .expect("an event for every update");
        let data = block
            .strip_prefix("event: environment_updated\ndata: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("not an event: {block:?}"));
        let now = Document { micros: m };
        let before = Document { micros: m - 1 };
        assert_eq!(go_newer(data, now), Some(false), "go: {data} for {m}");
        assert_eq!(go_newer(data, before), Some(true), "go: {data} for {m}");
        assert_eq!(python_newer(data, now), Some(false), "python: {data}");
        assert_eq!(python_newer(data, before), Some(true), "python: {data}");
        assert_eq!(js_newer(data, Some(now.header_f64())), Some(false), "js");
        assert_eq!(js_newer(data, Some(before.header_f64())), Some(true), "js");
        assert_eq!(ios_newer(data, ios_intended_baseline(now)), Some(false));
        assert_eq!(ios_newer(data, ios_intended_baseline(before)), Some(true));
        assert_eq!(
            android_newer(data, now.header_f64()),
            Some(false),
            "android"
        );
        assert_eq!(
            android_newer(data, before.header_f64()),
            Some(true),
            "android"
        );
        let held = json_f64(data).expect("a number");
        assert_eq!(ruby_newer(data, held), Some(false), "ruby");
        let fetched_ms = m.div_euclid(1_000) + 1;
        assert!(!flutter_newer(
            data,
            Some(flutter_last_get_flags(fetched_ms))
        ));
        assert!(flutter_newer(
            data,
            Some(flutter_last_get_flags(m / 1_000 - 1))
        ));
        // The stored text read back gives the same microseconds: a new subscriber's
        // latest-on-connect is the same text.
        assert_eq!(
            Timestamp::from_update_json(data.as_bytes()).map(Timestamp::micros),
            Ok(m)
        );
        if go_newer(&correctly_rounded(m), now) == Some(true) {
            overshoots += 1;
        }
    }
    let mut late = service.subscribe("sdks").await;
    let last = late
        .next_block(10 * SECOND)
        .await
        .expect("latest on connect");
    assert_eq!(
        last,
        format!("event: environment_updated\ndata: {}\n\n", sent(m))
    );
    // The test can tell: with the correctly rounded float, Go would have refetched for
    // many of these equal updates.
    assert!(
        overshoots > 100,
        "only {overshoots} of 300 would overshoot in Go"
    );
}

#[tokio::test]
async fn through_the_in_memory_broker() {
    let service = Service::start_with("nats://unused", &[("BROKER", "memory")]);
    every_sdk_decides_right_on_what_the_service_sends(&service).await;
}

#[tokio::test]
async fn through_nats() {
    let nats = Nats::start();
    let service = Service::start(&nats.url());
    every_sdk_decides_right_on_what_the_service_sends(&service).await;
    // A second instance reads every update back from JetStream's stored text.
    let second = Service::start(&nats.url());
    second.wait_ready().await;
    let mut sse = second.subscribe("sdks").await;
    let block = sse
        .next_block(10 * SECOND)
        .await
        .expect("latest on connect");
    let mut first = service.subscribe("sdks").await;
    let same = first
        .next_block(10 * SECOND)
        .await
        .expect("latest on connect");
    assert_eq!(block, same);
}
