//! A key's own rate limits and credits on the admin port (issue 14), the same on both
//! documents: the request shapes of create and PATCH and their checks, the shape every
//! key object shows them in (credits' `remaining` as of now, read from the limit store),
//! and the answer of `GET /v1/api-keys/{id}/usage`.

use super::keys::{duration_text, RATELIMIT_DURATION, REFILL_INTERVAL};
use super::{AdminState, ApiError};
use crate::limits::{self as counters, Ask, Headroom};
use crate::store::{Credits, KeyLimits, KeyRecord, RateLimit, Refill, StoreError};
use crate::time::{now_ms, rfc3339};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt::Display;

/// Most rate limits one key may have.
pub const MAX_RATELIMITS: usize = 8;
/// Largest `limit` of a rate limit.
pub const MAX_LIMIT: u64 = 1_000_000_000_000;
/// Largest `remaining` and refill `amount` of credits: the largest number the `RateLimit`
/// headers can carry (a structured field's integer has at most 15 digits).
pub const MAX_CREDITS: u64 = crate::error::SF_INTEGER_MAX;
/// The name the `RateLimit` headers give the credits policy: no rate limit may take it.
pub const RESERVED_NAME: &str = "credits";
/// The latest instant shown (9999-12-31T23:59:59Z): RFC 3339 has four year digits.
const LAST_SHOWN_MS: u64 = 253_402_300_799_000;

/// One entry of `ratelimits` in a create or PATCH body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBody {
    name: String,
    #[serde(deserialize_with = "whole")]
    limit: u64,
    duration: String,
}

/// `credits` in a create or PATCH body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsBody {
    #[serde(deserialize_with = "whole")]
    remaining: u64,
    #[serde(default)]
    refill: Option<RefillBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefillBody {
    #[serde(deserialize_with = "whole")]
    amount: u64,
    interval: String,
}

/// For `#[serde(default, deserialize_with = "present")]`: a field that is there, `null`
/// included, is `Some` (absent stays `None` by the default), so that `null` can mean
/// something else than leaving the field out.
pub fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A whole number of at least 0 as JSON Schema's `integer` has it: `5` or `5.0` (a
/// schema-valid body is never refused for its number's spelling); `5.5` and `-1` are not.
fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Whole;
    impl serde::de::Visitor<'_> for Whole {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number of at least 0")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u64, E> {
            // Below 2^64 and whole (an f64 this large is whole, but may not be exact).
            if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "checked above"
                )]
                Ok(v as u64)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(Whole)
}

fn invalid(field: impl Display, what: impl Display) -> ApiError {
    ApiError::bad_request("invalid_field", format!("field `{field}`: {what}"))
}

/// `^[a-z0-9][a-z0-9_.-]{0,31}$`, not `credits`: a limit's name, as metrics and the
/// `RateLimit` headers show it (the same rule as a route limit's, `key::valid_limit_name`).
pub fn valid_name(name: &str) -> bool {
    crate::key::valid_limit_name(name)
}

/// Check `ratelimits`: at most [`MAX_RATELIMITS`], each named uniquely (not `credits`),
/// `limit` 1 to [`MAX_LIMIT`] per `duration` (1s to 366d). Errors name the field,
/// `ratelimits[1].name`.
pub fn check_ratelimits(list: Vec<RateLimitBody>) -> Result<Vec<RateLimit>, ApiError> {
    if list.len() > MAX_RATELIMITS {
        return Err(invalid(
            "ratelimits",
            format_args!("at most {MAX_RATELIMITS} rate limits"),
        ));
    }
    let mut out: Vec<RateLimit> = Vec::with_capacity(list.len());
    for (i, l) in list.into_iter().enumerate() {
        let at = |f: &str| format!("ratelimits[{i}].{f}");
        if l.name == RESERVED_NAME {
            return Err(invalid(
                at("name"),
                "`credits` is reserved: it names the credits in the RateLimit headers",
            ));
        }
        if !valid_name(&l.name) {
            return Err(invalid(
                at("name"),
                "use 1 to 32 of a-z 0-9 _ . -, starting with a letter or digit",
            ));
        }
        if out.iter().any(|o| o.name == l.name) {
            return Err(invalid(
                at("name"),
                format_args!("{:?} is already the name of another rate limit", l.name),
            ));
        }
        if !(1..=MAX_LIMIT).contains(&l.limit) {
            return Err(invalid(at("limit"), format_args!("use 1 to {MAX_LIMIT}")));
        }
        let duration_ms = RATELIMIT_DURATION.parse_at(&at("duration"), &l.duration)?;
        out.push(RateLimit {
            name: l.name,
            limit: l.limit,
            duration_ms,
        });
    }
    Ok(out)
}

/// Check `credits` (`remaining` 0 to [`MAX_CREDITS`]; a refill of 1 to [`MAX_CREDITS`]
/// every 1m to 366d), counted from `set_at`.
pub fn check_credits(c: CreditsBody, set_at: u64) -> Result<Credits, ApiError> {
    if c.remaining > MAX_CREDITS {
        return Err(invalid(
            "credits.remaining",
            format_args!("use 0 to {MAX_CREDITS}"),
        ));
    }
    let refill = match c.refill {
        None => None,
        Some(r) => {
            if !(1..=MAX_CREDITS).contains(&r.amount) {
                return Err(invalid(
                    "credits.refill.amount",
                    format_args!("use 1 to {MAX_CREDITS}"),
                ));
            }
            let interval_ms = REFILL_INTERVAL.parse_at("credits.refill.interval", &r.interval)?;
            Some(Refill {
                amount: r.amount,
                interval_ms,
            })
        }
    };
    Ok(Credits {
        remaining: c.remaining,
        set_at,
        refill,
    })
}

/// The limits of a create body: both optional (`null` is none), credits from `now`.
pub fn from_body(
    ratelimits: Option<Vec<RateLimitBody>>,
    credits: Option<CreditsBody>,
    now: u64,
) -> Result<KeyLimits, ApiError> {
    Ok(KeyLimits {
        ratelimits: ratelimits
            .map(check_ratelimits)
            .transpose()?
            .unwrap_or_default(),
        credits: credits.map(|c| check_credits(c, now)).transpose()?,
        budget: None,
    })
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct RateLimitView {
    name: String,
    limit: u64,
    duration: String,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct RefillView {
    amount: u64,
    interval: String,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct CreditsView {
    /// What is left now (after the requests spent so far in this refill period).
    remaining: u64,
    refill: Option<RefillView>,
}

/// What a key object shows of its limits (`#[serde(flatten)]` into it): `ratelimits`
/// (always, maybe `[]`) and `credits` (`null`: unlimited).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    ratelimits: Vec<RateLimitView>,
    credits: Option<CreditsView>,
}

fn refill_view(r: &Refill) -> RefillView {
    RefillView {
        amount: r.amount,
        interval: duration_text(r.interval_ms),
    }
}

impl Shown {
    /// With the credits that are left (`None`: as set, for a key whose credits counter
    /// has just started: a new key, or credits a PATCH just set).
    pub fn new(limits: &KeyLimits, remaining: Option<u64>) -> Shown {
        Shown {
            ratelimits: limits
                .ratelimits
                .iter()
                .map(|l| RateLimitView {
                    name: l.name.clone(),
                    limit: l.limit,
                    duration: duration_text(l.duration_ms),
                })
                .collect(),
            credits: limits.credits.as_ref().map(|c| CreditsView {
                remaining: remaining.unwrap_or(c.remaining),
                refill: c.refill.as_ref().map(refill_view),
            }),
        }
    }
}

/// The states of `ask`'s counters now, one per counter (none asked: no store call).
async fn peek(s: &AdminState, ask: &Ask, now: u64) -> Result<Vec<Headroom>, ApiError> {
    if ask.counters.is_empty() {
        return Ok(Vec::new());
    }
    let out = s.limits.peek(ask, now).await?;
    if out.counters.len() != ask.counters.len() {
        return Err(StoreError::Corrupt {
            key: ask.key_id.clone(),
            reason: format!(
                "the limit store answered {} counters for {}",
                out.counters.len(),
                ask.counters.len()
            ),
        }
        .into());
    }
    Ok(out.counters)
}

/// The credits key `r` has left now (`None`: it has no credits); a limit store that
/// cannot be read is 503 `store_unavailable`.
pub async fn credits_remaining(s: &AdminState, r: &KeyRecord) -> Result<Option<u64>, ApiError> {
    if r.limits.credits.is_none() {
        return Ok(None);
    }
    // The credits counter is the last of the key's counters.
    let credits = counters::key_counters(&r.id, &r.limits, 1).pop();
    let ask = Ask {
        tag: counters::tag(&r.tenant),
        counters: credits.into_iter().collect(),
        key_id: r.id.clone(),
    };
    Ok(peek(s, &ask, now_ms()).await?.pop().map(|h| h.remaining))
}

/// How long a superseded credits counter is kept: far past the last exchange any replica
/// makes of what it spent there (each exchanges every `sync_interval`).
const RETIRED_KEEP_MS: u64 = 3_600_000;

/// The credits counter of `r`, if it has credits (the last of the key's counters).
fn credits_counter(r: &KeyRecord) -> Option<counters::Counter> {
    r.limits.credits.as_ref()?;
    counters::key_counters(&r.id, &r.limits, 1).pop()
}

/// `before`'s credits were replaced (now `after`'s): their counter, which would never
/// expire without a refill, is let go. Only for a key of its own: the keys of a rotation
/// chain spend one counter and may be changed concurrently, so a counter one of them
/// still spends on is never given an expiry (a counter left behind only takes room;
/// one that expires in use would give its credits back). Best effort.
pub async fn retire_credits(s: &AdminState, before: &KeyRecord, after: &KeyRecord) {
    let chained = |r: &KeyRecord| r.limits.budget.is_some() || r.successor_id.is_some();
    let Some(credits) = credits_counter(before) else {
        return;
    };
    // Two PATCHes within one millisecond name the same counter (`c:<budget>:<set_at>`).
    let in_use = |r: &KeyRecord| credits_counter(r).is_some_and(|c| c.id == credits.id);
    if chained(before) || chained(after) || in_use(after) {
        return;
    }
    // Read again: a rotation or another PATCH since may use it.
    match s.store.by_id(&before.tenant, &before.id).await {
        Ok(Some(now)) if !chained(&now) && !in_use(&now) => {}
        _ => return,
    }
    let ask = Ask {
        tag: counters::tag(&before.tenant),
        counters: vec![credits],
        key_id: before.id.clone(),
    };
    if let Err(e) = s.limits.retire(&ask, now_ms(), RETIRED_KEEP_MS).await {
        tracing::warn!(id = %before.id, error = %e, "superseded credits counter kept: no expiry could be set");
    }
}

/// What the key object of `r` shows of its limits, credits read now.
pub async fn shown(s: &AdminState, r: &KeyRecord) -> Result<Shown, ApiError> {
    Ok(Shown::new(&r.limits, credits_remaining(s, r).await?))
}

/// `shown` for each of a page of keys: the keys with credits read concurrently (at most
/// a page, bounded by the list limit).
pub async fn shown_all(s: &AdminState, records: &[KeyRecord]) -> Result<Vec<Shown>, ApiError> {
    futures_util::future::join_all(records.iter().map(|r| shown(s, r)))
        .await
        .into_iter()
        .collect()
}

#[derive(Serialize, Debug)]
pub struct Usage {
    id: String,
    ratelimits: Vec<RateLimitUsage>,
    credits: Option<CreditsUsage>,
    requests: Requests,
}

#[derive(Serialize, Debug)]
struct RateLimitUsage {
    name: String,
    limit: u64,
    duration: String,
    /// Requests left in the current window.
    remaining: u64,
    /// When the current window ends (and `remaining` is `limit` again).
    reset_at: String,
}

#[derive(Serialize, Debug)]
struct CreditsUsage {
    remaining: u64,
    refill: Option<RefillView>,
    /// When `remaining` is the refill's `amount` again (`null`: no refill).
    refills_at: Option<String>,
}

#[derive(Serialize, Debug)]
struct Requests {
    admitted: u64,
    refused: u64,
}

/// `now + in_ms` in RFC 3339, rounded up to the second (by then it has happened).
fn instant(now: u64, in_ms: u64) -> String {
    let at = now
        .saturating_add(in_ms)
        .div_ceil(1000)
        .saturating_mul(1000);
    rfc3339(at.min(LAST_SHOWN_MS))
}

/// The usage of key `r`: each rate limit's window and credits as they are now, and the
/// requests admitted and refused under the key's own id since it was created.
pub async fn usage(s: &AdminState, r: &KeyRecord) -> Result<Usage, ApiError> {
    let now = now_ms();
    let tag = counters::tag(&r.tenant);
    let ask = Ask {
        tag: tag.clone(),
        counters: counters::key_counters(&r.id, &r.limits, 1),
        key_id: r.id.clone(),
    };
    let (states, totals) = tokio::join!(peek(s, &ask, now), s.limits.totals(&tag, &r.id));
    let (states, (admitted, refused)) = (states?, totals?);
    let (limit_states, credit_states) = states.split_at(r.limits.ratelimits.len());
    let ratelimits = r
        .limits
        .ratelimits
        .iter()
        .zip(limit_states)
        .map(|(l, h)| RateLimitUsage {
            name: l.name.clone(),
            limit: l.limit,
            duration: duration_text(l.duration_ms),
            remaining: h.remaining,
            // A window is at most the limit's duration long.
            reset_at: instant(now, h.reset_ms.min(l.duration_ms)),
        })
        .collect();
    let credits = r
        .limits
        .credits
        .as_ref()
        .zip(credit_states.first())
        .map(|(c, h)| CreditsUsage {
            remaining: h.remaining,
            refill: c.refill.as_ref().map(refill_view),
            refills_at: c.refill.as_ref().map(|_| instant(now, h.reset_ms)),
        });
    Ok(Usage {
        id: r.id.clone(),
        ratelimits,
        credits,
        requests: Requests { admitted, refused },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pattern() {
        let re = regex::Regex::new("^[a-z0-9][a-z0-9_.-]{0,31}$").unwrap();
        for name in [
            "requests",
            "a",
            "0",
            "per-minute",
            "a.b_c-d",
            "",
            "-a",
            "_a",
            ".a",
            "A",
            "aB",
            "a b",
            "é",
            "credits",
            "a/b",
        ]
        .into_iter()
        .map(String::from)
        .chain(["x".repeat(32), "x".repeat(33)])
        {
            let want = re.is_match(&name) && name != RESERVED_NAME;
            assert_eq!(valid_name(&name), want, "{name:?}");
        }
    }

    #[test]
    fn numbers_may_be_written_as_whole_floats() {
        let parse = |text: &str| {
            serde_json::from_str::<CreditsBody>(&format!("{{\"remaining\": {text}}}"))
                .map(|c| c.remaining)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse("5"), Ok(5));
        assert_eq!(parse("5.0"), Ok(5));
        assert_eq!(parse("5e2"), Ok(500));
        assert_eq!(parse("-0.0"), Ok(0));
        assert_eq!(parse("18446744073709551615"), Ok(u64::MAX));
        for bad in ["5.5", "-1", "-1.0", "1e20", "\"5\"", "null", "true"] {
            let e = parse(bad).expect_err(bad);
            assert!(
                e.contains("expected a whole number of at least 0"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn an_instant_is_rounded_up_to_the_second_and_bounded() {
        assert_eq!(instant(1_000, 0), "1970-01-01T00:00:01Z");
        assert_eq!(instant(1_000, 1), "1970-01-01T00:00:02Z");
        assert_eq!(instant(0, u64::MAX), "9999-12-31T23:59:59Z");
    }
}
