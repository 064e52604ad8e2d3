//! `Deprecation` (RFC 9745) and `Sunset` (RFC 8594) on every answer to a key that is about
//! to stop working: one in a rotation's grace period, or one expiring within
//! `proxy.sunset_window`. Appended, never replacing: an upstream may send its own `Sunset`
//! for an endpoint, which is a different end from the key's.

use crate::cache::Identity;
use crate::policy::Lifecycle;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::{Duration, UNIX_EPOCH};

pub const DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
pub const SUNSET: HeaderName = HeaderName::from_static("sunset");

/// What a key's answers announce at `now_ms`: `Deprecation` (only in a rotation's grace)
/// and `Sunset`, both as Unix ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    pub deprecation: Option<u64>,
    pub sunset: u64,
}

/// What `id`'s answers announce at `now_ms`, if anything.
pub fn ending(rules: &Lifecycle, id: &Identity, now_ms: u64) -> Option<Ending> {
    // A future revocation is a rotation's grace (a revoke takes effect at once). The
    // rotation time is not kept with the cached key (it would grow `Identity` past
    // its budget), so `Deprecation` carries the revoke time too.
    let rotating = id.revoked_at().filter(|&r| r > now_ms);
    let expires = id.expires_at().filter(|&e| e > now_ms);
    match (rotating, expires) {
        (Some(r), e) => Some(Ending {
            deprecation: Some(r),
            sunset: e.map_or(r, |e| e.min(r)),
        }),
        (None, Some(e)) if e - now_ms <= rules.sunset_window_ms => Some(Ending {
            deprecation: None,
            sunset: e,
        }),
        _ => None,
    }
}

/// Append the headers `id` is owed, if any, to an answer made for it. A key without an
/// end (no expiry, no revocation) costs a comparison or two: no clock read, no allocation.
pub fn add(rules: &Lifecycle, headers: &mut HeaderMap, id: &Identity) {
    if !rules.headers || !id.may_end() {
        return;
    }
    let Some(end) = ending(rules, id, crate::time::now_ms()) else {
        return;
    };
    if let Some(d) = end.deprecation {
        headers.append(DEPRECATION, deprecation_value(d));
    }
    headers.append(SUNSET, sunset_value(end.sunset));
}

/// RFC 9745: a structured-field Date, `@` and Unix seconds (rounded down).
pub fn deprecation_value(ms: u64) -> HeaderValue {
    let text = format!("@{}", ms / 1000);
    // Digits after `@`: always a valid value; the fallback only avoids a panic path.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("@0"))
}

/// The last second an HTTP-date can name (9999-12-31T23:59:59Z): `httpdate` panics past
/// it, and a record's times are store input.
const LAST_HTTP_DATE_SECS: u64 = 253_402_300_799;

/// RFC 8594: an HTTP-date (IMF-fixdate), to the second (rounded down).
pub fn sunset_value(ms: u64) -> HeaderValue {
    let at = UNIX_EPOCH + Duration::from_secs((ms / 1000).min(LAST_HTTP_DATE_SECS));
    let text = httpdate::fmt_http_date(at);
    HeaderValue::from_str(&text)
        .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;
    const NOW: u64 = 1_800_000_000_000;

    fn identity(expires_at: Option<u64>, revoked_at: Option<u64>) -> Identity {
        Identity::sample(expires_at, revoked_at)
    }

    fn on() -> Lifecycle {
        Lifecycle {
            headers: true,
            sunset_window_ms: 7 * DAY,
        }
    }

    #[test]
    fn rotation_grace_is_deprecated_and_sunset_at_the_revoke_time() {
        let id = identity(None, Some(NOW + 3_600_500));
        let want = Ending {
            deprecation: Some(NOW + 3_600_500),
            sunset: NOW + 3_600_500,
        };
        assert_eq!(ending(&on(), &id, NOW), Some(want));
        // An expiry before the grace ends is the sooner end.
        let id = identity(Some(NOW + 60_000), Some(NOW + DAY));
        assert_eq!(
            ending(&on(), &id, NOW).map(|e| e.sunset),
            Some(NOW + 60_000)
        );
    }

    #[test]
    fn expiry_within_the_window_is_sunset_only() {
        let e = ending(&on(), &identity(Some(NOW + 7 * DAY), None), NOW);
        assert_eq!(
            e,
            Some(Ending {
                deprecation: None,
                sunset: NOW + 7 * DAY
            })
        );
        assert_eq!(
            ending(&on(), &identity(Some(NOW + 7 * DAY + 1), None), NOW),
            None
        );
    }

    #[test]
    fn keys_without_a_coming_end_get_nothing() {
        for (e, r) in [
            (None, None),
            (Some(NOW - 1), None),
            (None, Some(NOW)),
            (Some(NOW + 30 * DAY), None),
        ] {
            let id = identity(e, r);
            assert_eq!(ending(&on(), &id, NOW), None, "{e:?} {r:?}");
        }
        assert!(!identity(None, None).may_end());
    }

    #[test]
    fn values_are_a_structured_date_and_an_imf_fixdate() {
        assert_eq!(deprecation_value(1_700_000_000_999), "@1700000000");
        assert_eq!(
            sunset_value(1_700_000_000_999),
            "Tue, 14 Nov 2023 22:13:20 GMT"
        );
        assert_eq!(sunset_value(u64::MAX - 1), "Fri, 31 Dec 9999 23:59:59 GMT");
    }

    #[test]
    fn off_adds_nothing() {
        let id = identity(None, Some(u64::MAX - 1));
        let mut h = HeaderMap::new();
        let off = Lifecycle {
            headers: false,
            ..on()
        };
        add(&off, &mut h, &id);
        assert!(h.is_empty());
        add(&on(), &mut h, &id);
        assert_eq!(h.get_all(SUNSET).iter().count(), 1);
        assert_eq!(h.get_all(DEPRECATION).iter().count(), 1);
    }
}
