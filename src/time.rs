//! Wall-clock helpers: keygate stores instants as Unix milliseconds and shows them as RFC 3339.

use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

static START: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds on a monotonic clock (since the first call in this process): for local
/// deadlines that a wall-clock step must not stretch.
pub fn mono_ms() -> u64 {
    START.elapsed().as_millis() as u64
}

/// `mono_ms` of an instant the caller already read (one clock read fewer).
pub fn mono_ms_at(at: Instant) -> u64 {
    at.saturating_duration_since(*START).as_millis() as u64
}

/// Milliseconds since the Unix epoch, now.
#[allow(clippy::disallowed_methods, reason = "the one wall-clock read")]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch, now (log timestamps).
#[allow(clippy::disallowed_methods, reason = "the log's wall-clock read")]
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `2026-06-12T14:24:37.123456Z`: a log line's timestamp, as `tracing`'s formatter writes it.
pub fn rfc3339_micros(us: u64) -> impl std::fmt::Display {
    humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(us))
}

/// `2026-06-12T14:24:37Z`, the shape both API documents use.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `2026-06-12T14:24:37Z` (fractions of a second allowed, UTC only) as Unix ms; `None`
/// for anything else or a time before 1970.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(text).ok()?;
    let since = t.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// `250ms`, `30s`, `12h`, `90d`, `1h 30m`: the one duration parser, of config files
/// (surrounding spaces ignored) and of both API documents, which first narrow the syntax
/// to a whole number and one unit (`admin::keys::DurationField`). The caller names the
/// field and the range.
pub fn parse_duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text.trim())
}
