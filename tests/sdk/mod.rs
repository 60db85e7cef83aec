//! Each Flagsmith SDK's real-time decision, copied from its source: what it reads from an
//! `environment_updated` event, what it compares that with, in which numeric type, and
//! what it holds after it refetched. Shared by the property tests (`sdk_arithmetic.rs`)
//! and the emulations run against the service (`clients.rs`).
//!
//! Sources read (repository, commit, file):
//! - Go: Flagsmith/flagsmith-go-client ca217b43bd08 (v5), `realtime.go`
//!   (`handleEvent`, `parseUpdatedAtFromSSE`, `connect`, `start`), `client.go`
//!   (`pollThenStartRealtime`, `UpdateEnvironment`), `backoff.go`.
//! - Python: Flagsmith/flagsmith-python-client 9a85c057e0bc (6.1.0),
//!   `flagsmith/streaming_manager.py`, `flagsmith/mappers.py`
//!   (`map_sse_event_to_stream_event`), `flagsmith/flagsmith.py` (`handle_stream_event`,
//!   `update_environment`).
//! - JavaScript: Flagsmith/flagsmith-js-client 41c09d1019e8, `flagsmith-core.ts`
//!   (`setupRealtime`, the `x-flagsmith-document-updated-at` read in `getJSON`),
//!   `patches/reconnecting-eventsource+1.5.0.patch`.
//! - Ruby: Flagsmith/flagsmith-ruby-client e5c52d8a8d06 (4.3.0),
//!   `lib/flagsmith/sdk/realtime_client.rb`.
//! - iOS: Flagsmith/flagsmith-ios-client bb8564b4b22e (3.10.0),
//!   `FlagsmithClient/Classes/Flagsmith.swift` (`handleSSEResult`,
//!   `updateFlagStreamAndLastUpdatedAt`), `Classes/Internal/APIManager.swift`
//!   (`updateLastUpdatedFromRequest`), `Classes/Internal/SSEManager.swift`, `FlagEvent.swift`.
//! - Android: Flagsmith/flagsmith-kotlin-android-client 17013eb211c1,
//!   `FlagsmithClient/src/main/java/com/flagsmith/Flagsmith.kt` (the `eventService`
//!   callback), `internal/FlagsmithRetrofitService.kt` (`updatedAtInterceptor`),
//!   `internal/FlagsmithEventService.kt`, `entities/FlagEvent.kt`.
//! - Flutter: Flagsmith/flagsmith-flutter-client b156c85a6af4 (6.1.0),
//!   `lib/src/flagsmith_client.dart` (`_setupRealtimeUpdates`, `onEventReceived`, `_getFlags`),
//!   `lib/src/core/datetime_x.dart`; its SSE client pratikbaid3/flutter_client_sse
//!   89a7036174f3 (2.0.3), `lib/flutter_client_sse.dart`.
//! - What the API gives: Flagsmith/flagsmith 1ad8487ba7aa, `api/sse/tasks.py` and
//!   `api/sse/sse_service.py` (posts `environment.updated_at.isoformat()`: exact
//!   microseconds), `api/util/mappers/engine.py` (the environment document's `updated_at`
//!   is `environment.updated_at`, exact), `api/environments/sdk/views.py`,
//!   `api/features/views.py`, `api/environments/identities/views.py` (the header is
//!   `updated_at.timestamp()`, a correctly rounded float, as `str()` writes it).
#![allow(dead_code)]

use std::collections::HashMap;

use serde_json::value::RawValue;

/// The number literal of `updated_at` in an event's data, as the JSON text has it.
pub fn updated_at_literal(data: &str) -> Option<String> {
    let fields: HashMap<String, Box<RawValue>> = serde_json::from_str(data).ok()?;
    let raw = fields.get("updated_at")?.get();
    raw.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        .then(|| raw.to_owned())
}

/// A JSON number as every SDK's parser reads it (Go's `strconv.ParseFloat`, `JSON.parse`,
/// Python's `float`, Ruby's `strtod`, Swift's and Java's `Double` parsing, Dart's
/// `double.parse`): the nearest `f64`. Rust's parser is correctly rounded too.
pub fn json_f64(data: &str) -> Option<f64> {
    updated_at_literal(data)?.parse().ok()
}

/// A JSON number literal that Dart's `jsonDecode` makes a `double` (a fraction or an
/// exponent), not an `int`.
pub fn is_dart_double(literal: &str) -> bool {
    literal.contains(['.', 'e', 'E'])
}

/// What Flagsmith's API says about an environment whose `updated_at` is `micros`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Document {
    pub micros: i64,
}

impl Document {
    /// The environment document's `updated_at` (ISO-8601 with six digits): exact.
    pub fn updated_at_micros(self) -> i64 {
        self.micros
    }

    /// `X-Flagsmith-Document-Updated-At`: `str(updated_at.timestamp())`, Python's shortest
    /// text of the correctly rounded float. Rust writes the same digits (Python would
    /// switch to an exponent below 1e-4, which no real time is).
    pub fn header(self) -> String {
        let value = self.micros as f64 / 1e6;
        if value.fract() == 0.0 {
            format!("{value}.0")
        } else {
            format!("{value}")
        }
    }

    /// The header as the SDK parses it (`parseFloat`, Swift's `Double(String)`, Kotlin's
    /// `toDoubleOrNull`): the nearest double.
    pub fn header_f64(self) -> f64 {
        self.header().parse().expect("header is a number")
    }
}

/// The ISO-8601 text Flagsmith's API posts for `micros` (`datetime.isoformat()` in UTC).
pub fn iso(micros: i64) -> String {
    let (secs, frac) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let time = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    );
    if frac == 0 {
        format!("{time}+00:00")
    } else {
        format!("{time}.{frac:06}+00:00")
    }
}

/// Go, `realtime.go` `parseUpdatedAtFromSSE`: `json.Unmarshal` into a `float64`; `<= 0` is
/// an error (the event is logged and skipped); then
/// `seconds := int64(f); nanoseconds := int64((f - float64(seconds)) * 1e9)`,
/// `time.Unix(seconds, nanoseconds)`. Returned as nanoseconds since the epoch.
pub fn go_parse(data: &str) -> Option<i128> {
    let f = json_f64(data)?;
    if f <= 0.0 {
        return None;
    }
    // Go's float-to-int conversion truncates toward zero, as `as` does in range.
    let seconds = f as i64;
    let nanoseconds = ((f - seconds as f64) * 1e9) as i64;
    Some(i128::from(seconds) * 1_000_000_000 + i128::from(nanoseconds))
}

/// Go, `handleEvent`: `parsedTime.After(r.envUpdatedAt)`, where `envUpdatedAt` is the
/// environment document's `updated_at` (exact microseconds) fetched before the stream
/// started (`pollThenStartRealtime`) and after each refetch. `None`: the event is skipped.
pub fn go_newer(data: &str, document: Document) -> Option<bool> {
    Some(go_parse(data)? > i128::from(document.updated_at_micros()) * 1_000)
}

/// Python, `map_sse_event_to_stream_event`: `json.loads` gives a float;
/// `datetime.fromtimestamp(f, tz=utc)` rounds it to a microsecond, half to even
/// (CPython's `_PyTime_ObjectToTimeval(..., _PyTime_ROUND_HALF_EVEN)`: `modf`, the
/// fraction times 1e6, rounded, a carry at 1e6). Returned as microseconds.
pub fn python_from_timestamp(f: f64) -> i64 {
    let whole = f.trunc();
    let mut micros = ((f - whole) * 1e6).round_ties_even();
    let mut seconds = whole;
    if micros >= 1e6 {
        micros -= 1e6;
        seconds += 1.0;
    }
    seconds as i64 * 1_000_000 + micros as i64
}

/// Python, `handle_stream_event`: `event["updated_at"] > self._environment_updated_at`,
/// the environment document's `updated_at` (`fromisoformat`, exact microseconds), set by
/// `update_environment` before the stream starts and after each refetch.
pub fn python_newer(data: &str, document: Document) -> Option<bool> {
    Some(python_from_timestamp(json_f64(data)?) > document.updated_at_micros())
}

/// JavaScript, `setupRealtime`: `updated_at = JSON.parse(e.data).updated_at`; nothing for a
/// falsy one; a refetch when `!this.timestamp || updated_at > this.timestamp`, where
/// `this.timestamp = parseFloat(res.headers.get('x-flagsmith-document-updated-at'))` from
/// the last flags response (`None`: no response yet).
pub fn js_newer(data: &str, timestamp: Option<f64>) -> Option<bool> {
    let updated_at = json_f64(data).filter(|f| *f != 0.0)?;
    Some(timestamp.is_none_or(|t| t == 0.0) || updated_at > timestamp.unwrap_or(0.0))
}

/// Ruby, `listen`: `updated_at = JSON.parse(...)['updated_at']`;
/// `next unless updated_at > last_updated_at`, where `last_updated_at` starts at `0` when
/// `listen` is called (once, not per reconnect) and becomes each `updated_at` it refetched
/// for. Ruby compares an Integer literal with a Float numerically, as a double does here.
pub fn ruby_newer(data: &str, last_updated_at: f64) -> Option<bool> {
    Some(json_f64(data)? > last_updated_at)
}

/// iOS, `handleSSEResult`: `if lastUpdatedAt < event.updatedAt` (both `Double`; the event
/// decoded by `JSONDecoder` into `FlagEvent.updatedAt: Double`).
pub fn ios_newer(data: &str, last_updated_at: f64) -> Option<bool> {
    Some(last_updated_at < json_f64(data)?)
}

/// What iOS's `lastUpdatedAt` really holds at bb8564b4b22e: it starts at `0.0` and is raised
/// only from `apiManager.lastUpdatedAt`, which only `updateLastUpdatedFromRequest` sets, and
/// nothing calls that function (it would read the header from the request, not the
/// response, anyway). So it stays `0.0` and every event, the equal one sent on each
/// reconnect included, makes iOS refetch its flags.
pub const IOS_LAST_UPDATED_AT: f64 = 0.0;

/// What iOS would hold if `updateLastUpdatedFromRequest` were called with the response's
/// headers, as the code intends: `Double(header)`.
pub fn ios_intended_baseline(document: Document) -> f64 {
    document.header_f64()
}

/// Android, the `FlagsmithEventService` callback in `Flagsmith.kt`:
/// `lastEventUpdate = event.updatedAt` (Gson into a `Double`);
/// `if (lastEventUpdate > lastFlagFetchTime)` it sets `lastFlagFetchTime = lastEventUpdate`
/// and refetches, after which `updatedAtInterceptor` sets `lastFlagFetchTime` from the
/// response's `x-flagsmith-document-updated-at` (`toDoubleOrNull`).
pub fn android_newer(data: &str, last_flag_fetch_time: f64) -> Option<bool> {
    Some(json_f64(data)? > last_flag_fetch_time)
}

/// Flutter, `onEventReceived`: only an `environment_updated` event whose `updated_at`
/// decodes as a Dart `double` counts (an `int` literal is ignored, as is a missing one:
/// `lastEventUpdate` stays null); `(lastEventUpdate ?? 0) > (lastGetFlags ?? 0)`, where
/// `lastGetFlags` is the device's clock when flags were last fetched:
/// `DateTime.now().millisecondsSinceEpoch / 1000` (`datetime_x.dart`).
pub fn flutter_newer(data: &str, last_get_flags: Option<f64>) -> bool {
    let last_event_update = updated_at_literal(data)
        .filter(|literal| is_dart_double(literal))
        .and_then(|literal| literal.parse::<f64>().ok());
    last_event_update.unwrap_or(0.0) > last_get_flags.unwrap_or(0.0)
}

/// Flutter's `lastGetFlags` for a fetch at `millis` on the device's clock.
pub fn flutter_last_get_flags(millis: i64) -> f64 {
    millis as f64 / 1000.0
}

/// The data of an event as the service writes it for `micros`.
pub fn event_data(rendered: &str) -> String {
    format!("{{\"updated_at\": {rendered}}}")
}
