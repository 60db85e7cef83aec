//! The route table: which request target is which endpoint. Both the HTTP/1.1 fast path
//! and hyper's router read it, so a path means the same thing whoever serves it.
//!
//! What real callers send is served, not only the canonical paths: Flagsmith's API builds
//! `f"{SSE_SERVER_BASE_URL}/sse/environments/{key}/queue-change"`, so a base URL written with
//! a trailing slash gives `//sse/...`; SDK base URLs do the same for streams. So repeated
//! slashes collapse, a trailing slash is accepted, and a query string is ignored (the JS SDK
//! appends `?lastEventId=` once an event carried an id).

/// One endpoint. Keys are slices of the request target: routing allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Stream(&'a str),
    QueueChange(&'a str),
    Live,
    Ready,
    Metrics,
}

/// The most path segments any route has (`sse/environments/{key}/queue-change`).
const MAX_SEGMENTS: usize = 4;

/// The endpoint `target` (a path, with or without a query string) names, if any.
pub fn route(target: &str) -> Option<Route<'_>> {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let mut segments = [""; MAX_SEGMENTS];
    let mut count = 0;
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        *segments.get_mut(count)? = segment;
        count += 1;
    }
    match &segments[..count] {
        // `/health/...` are the probes of Flagsmith's Helm chart, `/health` and
        // `/sse/health` those of older set-ups.
        ["livez"] | ["health"] | ["health", "liveness"] | ["sse", "health"] => Some(Route::Live),
        ["readyz"] | ["health", "readiness"] => Some(Route::Ready),
        ["metricsz"] => Some(Route::Metrics),
        ["sse", "environments", key, "stream"] => Some(Route::Stream(key)),
        ["sse", "environments", key, "queue-change"] => Some(Route::QueueChange(key)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        assert_eq!(
            route("/sse/environments/abc/stream"),
            Some(Route::Stream("abc"))
        );
        assert_eq!(
            route("/sse/environments/abc/queue-change"),
            Some(Route::QueueChange("abc"))
        );
        for live in ["/livez", "/health", "/health/liveness", "/sse/health"] {
            assert_eq!(route(live), Some(Route::Live), "{live}");
        }
        for ready in ["/readyz", "/health/readiness"] {
            assert_eq!(route(ready), Some(Route::Ready), "{ready}");
        }
        assert_eq!(route("/metricsz"), Some(Route::Metrics));
    }

    /// What Flagsmith's API (`api/sse/tasks.py`, base URL with a trailing slash) and SDKs
    /// (JS `?lastEventId=`, base URLs with slashes) really send.
    #[test]
    fn what_callers_really_send() {
        for (target, want) in [
            ("//sse/environments/k/queue-change", Route::QueueChange("k")),
            ("/sse/environments/k/queue-change/", Route::QueueChange("k")),
            ("//sse//environments//k//stream//", Route::Stream("k")),
            ("/sse/environments/k/stream/", Route::Stream("k")),
            (
                "/sse/environments/k/stream?lastEventId=",
                Route::Stream("k"),
            ),
            ("/sse/environments/k/stream/?a=1&b=/x", Route::Stream("k")),
            ("/health/liveness/", Route::Live),
            ("/health/readiness/", Route::Ready),
            ("/sse/health/", Route::Live),
            ("/livez?probe=1", Route::Live),
        ] {
            assert_eq!(route(target), Some(want), "{target}");
        }
    }

    #[test]
    fn everything_else_is_no_route() {
        for target in [
            "/",
            "",
            "/sse/environments/k",
            "/sse/environments/k/other",
            "/sse/environments/k/stream/extra",
            "/sse/environments/a/b/stream",
            "/sse/environments//stream",
            "/x/sse/environments/k/stream",
            "/metricsz/x",
            "?/livez",
            "/a/b/c/d/e/f",
        ] {
            assert_eq!(route(target), None, "{target:?}");
        }
    }
}
