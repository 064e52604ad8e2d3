//! keygate's own answers on the proxy port: every refusal is a `Deny`, and `Deny::response`
//! is the one place that turns it into a status, a stable JSON code and RFC 6750 headers.
//! `Deny::iter()` lists every variant: the metric labels and the README's decision table
//! follow from it, and every mapping is an exhaustive `match` (no fallback arm).

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response keygate writes or forwards.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// draft-ietf-httpapi-ratelimit-headers-11.
pub const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// The largest integer a structured field may carry.
pub const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// The `RateLimit-Policy` value of a counter: `"name";q=100;w=60` (no `w` for credits that
/// never refill, `period_ms` `u64::MAX`).
pub fn ratelimit_policy(name: &str, quota: u64, period_ms: u64) -> HeaderValue {
    let window = (period_ms != u64::MAX).then(|| (b'w', period_ms.div_ceil(1000)));
    ratelimit_item(name, (b'q', quota), window)
}

/// One `RateLimit`/`RateLimit-Policy` item, `"name";a=1;b=2` (parameters named by one
/// letter), in one allocation of its exact size (names are validated to a header-safe
/// alphabet). Built on every limited answer: bytes are pushed, not formatted.
/// A number past a structured field's integer (15 digits, RFC 8941 3.3.1) is shown as the
/// largest one: a parser refuses the whole field otherwise.
pub fn ratelimit_item(name: &str, a: (u8, u64), b: Option<(u8, u64)>) -> HeaderValue {
    let (mut num_a, mut num_b) = (itoa::Buffer::new(), itoa::Buffer::new());
    let a = (a.0, num_a.format(a.1.min(SF_INTEGER_MAX)));
    let b = b.map(|(k, v)| (k, num_b.format(v.min(SF_INTEGER_MAX))));
    let param = |(_, n): (u8, &str)| 3 + n.len();
    let mut v = Vec::with_capacity(2 + name.len() + param(a) + b.map_or(0, param));
    v.push(b'"');
    v.extend_from_slice(name.as_bytes());
    v.push(b'"');
    for (k, n) in std::iter::once(a).chain(b) {
        v.extend_from_slice(&[b';', k, b'=']);
        v.extend_from_slice(n.as_bytes());
    }
    HeaderValue::from_maybe_shared(Bytes::from(v))
        .unwrap_or_else(|_| HeaderValue::from_static("\"limit\";q=0"))
}

const CHALLENGE: HeaderValue = HeaderValue::from_static("Bearer realm=\"keygate\"");
const INVALID_TOKEN: HeaderValue =
    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"invalid_token\"");
const INVALID_REQUEST: HeaderValue =
    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"invalid_request\"");
const INSUFFICIENT: HeaderValue =
    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"insufficient_scope\"");

/// A route's `WWW-Authenticate` value for a key lacking its scopes (with its `scope`),
/// built once at load. The default names no scope (what `Deny::iter` yields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge(pub HeaderValue);

impl Default for Challenge {
    fn default() -> Self {
        Challenge(INSUFFICIENT)
    }
}

impl Challenge {
    /// The challenge naming `scopes` (validated at load to a header-safe alphabet).
    pub fn for_scopes<S: AsRef<str>>(scopes: &[S]) -> Challenge {
        let scopes: Vec<&str> = scopes.iter().map(AsRef::as_ref).collect();
        let v = format!(
            "Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"{}\"",
            scopes.join(" ")
        );
        Challenge(HeaderValue::from_str(&v).unwrap_or(INSUFFICIENT))
    }
}

/// The headers of a 429: `Retry-After` (seconds) and the draft-ietf-httpapi-ratelimit-
/// headers-11 `RateLimit-Policy` and `RateLimit` of the limit that refused. Empty in
/// what `Deny::iter` yields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Throttle {
    pub retry_after: Option<HeaderValue>,
    pub policy: Option<HeaderValue>,
    pub state: Option<HeaderValue>,
}

/// Every reason keygate answers a proxied request itself.
#[derive(Debug, Clone, PartialEq, Eq, strum::EnumIter, strum::EnumCount)]
pub enum Deny {
    MissingKey,
    UnsupportedScheme,
    MultipleAuthorization,
    MalformedKey,
    UnknownKey,
    ExpiredKey,
    RevokedKey,
    PublishableNotAllowed,
    /// Carries the route's prebuilt `WWW-Authenticate` value (with its `scope`).
    InsufficientScope(Challenge),
    /// A rate limit (the key's or the route's) is exhausted for its window.
    RateLimited(Throttle),
    /// The key's credits do not cover this request's cost.
    CreditsExhausted(Throttle),
    NoRoute,
    BadPath,
    /// HTTP/1.1 without `Host`, several `Host` headers, or an invalid host (RFC 9112 §3.2).
    BadHost,
    /// The client's request body broke its framing (bad chunked encoding) or was cut off.
    BadRequestBody,
    /// More header fields than `max_header_bytes / 16` (HTTP/2; hyper refuses them on
    /// HTTP/1 itself).
    TooManyHeaders,
    /// The request body stopped arriving (nothing for `timeouts.idle`).
    RequestTimeout,
    /// A method with lower-case letters: WSGI and Rack upper-case it, so `delete` would
    /// be checked as one method and run as another.
    BadMethod,
    UriTooLong,
    BodyTooLarge,
    StoreUnavailable,
    UpstreamUnavailable,
    UpstreamTimeout,
}

impl Deny {
    /// Every variant once, in declaration order (`InsufficientScope` naming no scope).
    pub fn iter() -> impl Iterator<Item = Deny> {
        <Deny as strum::IntoEnumIterator>::iter()
    }

    /// This variant's place in `Deny::iter()`: the metric handles are indexed by it.
    pub fn index(&self) -> usize {
        use Deny::*;
        match self {
            MissingKey => 0,
            UnsupportedScheme => 1,
            MultipleAuthorization => 2,
            MalformedKey => 3,
            UnknownKey => 4,
            ExpiredKey => 5,
            RevokedKey => 6,
            PublishableNotAllowed => 7,
            InsufficientScope(_) => 8,
            RateLimited(_) => 9,
            CreditsExhausted(_) => 10,
            NoRoute => 11,
            BadPath => 12,
            BadHost => 13,
            BadRequestBody => 14,
            TooManyHeaders => 15,
            RequestTimeout => 16,
            BadMethod => 17,
            UriTooLong => 18,
            BodyTooLarge => 19,
            StoreUnavailable => 20,
            UpstreamUnavailable => 21,
            UpstreamTimeout => 22,
        }
    }

    pub fn status(&self) -> StatusCode {
        use Deny::*;
        match self {
            MissingKey | UnsupportedScheme | MalformedKey | UnknownKey | ExpiredKey => {
                StatusCode::UNAUTHORIZED
            }
            RevokedKey | PublishableNotAllowed | InsufficientScope(_) => StatusCode::FORBIDDEN,
            MultipleAuthorization | BadPath | BadHost | BadRequestBody | BadMethod => {
                StatusCode::BAD_REQUEST
            }
            NoRoute => StatusCode::NOT_FOUND,
            RateLimited(_) | CreditsExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            UriTooLong => StatusCode::URI_TOO_LONG,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            TooManyHeaders => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable machine-readable code, also the `result` metrics label.
    pub fn code(&self) -> &'static str {
        use Deny::*;
        match self {
            MissingKey => "missing_key",
            UnsupportedScheme => "unsupported_auth_scheme",
            MultipleAuthorization => "multiple_authorization",
            MalformedKey => "malformed_key",
            UnknownKey => "unknown_key",
            ExpiredKey => "expired_key",
            RevokedKey => "revoked_key",
            PublishableNotAllowed => "publishable_key_not_allowed",
            InsufficientScope(_) => "insufficient_scope",
            RateLimited(_) => "rate_limited",
            CreditsExhausted(_) => "credits_exhausted",
            NoRoute => "no_route",
            BadPath => "bad_path",
            BadHost => "bad_host",
            BadRequestBody => "bad_request_body",
            BadMethod => "bad_method",
            RequestTimeout => "request_timeout",
            TooManyHeaders => "too_many_headers",
            UriTooLong => "uri_too_long",
            BodyTooLarge => "body_too_large",
            StoreUnavailable => "store_unavailable",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamTimeout => "upstream_timeout",
        }
    }

    pub fn message(&self) -> &'static str {
        use Deny::*;
        match self {
            MissingKey => "an API key is required: send Authorization: Bearer <key>",
            UnsupportedScheme => "only the Bearer authorization scheme is accepted",
            MultipleAuthorization => "send exactly one Authorization header",
            MalformedKey => "the API key is malformed",
            UnknownKey => "the API key is not valid",
            ExpiredKey => "the API key has expired",
            RevokedKey => "the API key has been revoked",
            PublishableNotAllowed => "publishable keys may not call this route",
            InsufficientScope(_) => "the API key lacks a scope this route requires",
            RateLimited(_) => {
                "a rate limit of this API key is exhausted; retry after Retry-After seconds"
            }
            CreditsExhausted(_) => "the API key has no credits left for this request",
            NoRoute => "no route matches this request",
            BadPath => "the request path is not acceptable",
            BadHost => "the request needs exactly one valid host (Host header or http(s) target)",
            BadRequestBody => "the request body is malformed or incomplete",
            BadMethod => "the request method must be upper case",
            RequestTimeout => "the request body stopped arriving",
            TooManyHeaders => "the request carries too many header fields",
            UriTooLong => "the request target is too long",
            BodyTooLarge => "the request body is too large for this route",
            StoreUnavailable => "the key store is unavailable; retry shortly",
            UpstreamUnavailable => "the upstream service is unreachable",
            UpstreamTimeout => "the upstream service did not answer in time",
        }
    }

    fn challenge(&self) -> Option<HeaderValue> {
        use Deny::*;
        match self {
            MissingKey | UnsupportedScheme => Some(CHALLENGE),
            MalformedKey | UnknownKey | ExpiredKey | RevokedKey => Some(INVALID_TOKEN),
            MultipleAuthorization => Some(INVALID_REQUEST),
            PublishableNotAllowed => Some(INSUFFICIENT),
            InsufficientScope(c) => Some(c.0.clone()),
            NoRoute | BadPath | BadHost | BadRequestBody | TooManyHeaders | RequestTimeout
            | BadMethod | UriTooLong | BodyTooLarge | StoreUnavailable | UpstreamUnavailable
            | UpstreamTimeout | RateLimited(_) | CreditsExhausted(_) => None,
        }
    }

    /// Close the connection after answering: the request's framing can't be trusted.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Deny::BodyTooLarge | Deny::BadRequestBody | Deny::RequestTimeout
        )
    }

    fn body(&self) -> String {
        format!(
            "{{\"error\":{{\"code\":\"{}\",\"message\":\"{}\"}}}}",
            self.code(),
            self.message()
        )
    }

    pub fn response(&self) -> Response<Body> {
        let mut resp = Response::new(full(self.body()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(c) = self.challenge() {
            h.insert(WWW_AUTHENTICATE, c);
        }
        if *self == Deny::StoreUnavailable {
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Deny::RateLimited(t) | Deny::CreditsExhausted(t) = self {
            let named = [
                (RETRY_AFTER, &t.retry_after),
                (RATELIMIT_POLICY, &t.policy),
                (RATELIMIT, &t.state),
            ];
            for (name, value) in named {
                if let Some(v) = value {
                    h.insert(name, v.clone());
                }
            }
        }
        if self.closes_connection() {
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl Deny {
    /// The whole HTTP/1.1 answer as bytes, for a refusal made before hyper has parsed a
    /// request (a first request line over the limit); it always closes the connection.
    pub fn raw_http1(&self) -> Vec<u8> {
        let status = self.status();
        let body = self.body();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::EnumCount;

    #[test]
    fn ratelimit_numbers_stay_structured_field_integers() {
        let v = ratelimit_item(
            "credits",
            (b'q', 1_000_000_000_000_000),
            Some((b'w', 86_400)),
        );
        assert_eq!(v, "\"credits\";q=999999999999999;w=86400");
        let v = ratelimit_item("credits", (b'r', u64::MAX), None);
        assert_eq!(v, "\"credits\";r=999999999999999");
        assert_eq!(ratelimit_policy("a", 5, 1_500), "\"a\";q=5;w=2");
    }

    const TOKEN: &str = "Bearer realm=\"keygate\", error=\"invalid_token\"";
    const SCOPE: &str = "Bearer realm=\"keygate\", error=\"insufficient_scope\"";

    /// The decision table of the README, pinned: every variant's status, code and
    /// `WWW-Authenticate`. A variant missing here fails the test.
    const TABLE: &[(&str, u16, Option<&str>)] = &[
        ("missing_key", 401, Some("Bearer realm=\"keygate\"")),
        (
            "unsupported_auth_scheme",
            401,
            Some("Bearer realm=\"keygate\""),
        ),
        (
            "multiple_authorization",
            400,
            Some("Bearer realm=\"keygate\", error=\"invalid_request\""),
        ),
        ("malformed_key", 401, Some(TOKEN)),
        ("unknown_key", 401, Some(TOKEN)),
        ("expired_key", 401, Some(TOKEN)),
        ("revoked_key", 403, Some(TOKEN)),
        ("publishable_key_not_allowed", 403, Some(SCOPE)),
        ("insufficient_scope", 403, Some(SCOPE)),
        ("rate_limited", 429, None),
        ("credits_exhausted", 429, None),
        ("no_route", 404, None),
        ("bad_path", 400, None),
        ("bad_host", 400, None),
        ("bad_request_body", 400, None),
        ("too_many_headers", 431, None),
        ("request_timeout", 408, None),
        ("bad_method", 400, None),
        ("uri_too_long", 414, None),
        ("body_too_large", 413, None),
        ("store_unavailable", 503, None),
        ("upstream_unavailable", 502, None),
        ("upstream_timeout", 504, None),
    ];

    #[test]
    fn every_variant_has_its_pinned_status_code_and_challenge() {
        assert_eq!(TABLE.len(), Deny::COUNT, "one row per variant");
        for deny in Deny::iter() {
            let code = deny.code();
            let row = TABLE.iter().find(|(c, _, _)| *c == code);
            let (_, status, challenge) = row.unwrap_or_else(|| panic!("{code} is not pinned"));
            let r = deny.response();
            assert_eq!(r.status().as_u16(), *status, "{code}");
            assert_eq!(r.status(), deny.status(), "{code}");
            let got = r.headers().get(WWW_AUTHENTICATE);
            assert_eq!(got.map(|v| v.to_str().unwrap()), *challenge, "{code}");
            assert!(!deny.message().is_empty(), "{code}");
        }
    }

    #[test]
    fn a_route_challenge_names_its_scopes() {
        let deny = Deny::InsufficientScope(Challenge::for_scopes(&["users:read", "a:b"]));
        let r = deny.response();
        assert_eq!(
            r.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"users:read a:b\""
        );
    }

    /// `index` is the place in `iter`, and codes are unique: the metric labels and the
    /// per-route counters are built from them.
    #[test]
    fn indexes_follow_the_variant_list_and_codes_are_unique() {
        let all: Vec<Deny> = Deny::iter().collect();
        assert_eq!(all.len(), Deny::COUNT);
        for (i, d) in all.iter().enumerate() {
            assert_eq!(d.index(), i, "{}", d.code());
            assert!(
                all[..i].iter().all(|e| e.code() != d.code()),
                "{}",
                d.code()
            );
        }
    }

    /// The README's decision table and its `keygate_requests_total` labels list every
    /// code, with the status keygate answers.
    #[test]
    fn the_readme_lists_every_decision() {
        let readme = include_str!("../README.md");
        let table = readme
            .split("## Decisions on the proxy port")
            .nth(1)
            .and_then(|t| t.split("\n## ").next())
            .expect("README has the decision table");
        let metric_row = readme
            .lines()
            .find(|l| l.starts_with("| `keygate_requests_total`"))
            .expect("README documents keygate_requests_total");
        for deny in Deny::iter() {
            let code = format!("`{}`", deny.code());
            let rows: Vec<Vec<&str>> = table
                .lines()
                .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
                .filter(|cols| cols.len() > 4 && cols[3].starts_with(&code))
                .collect();
            assert_eq!(rows.len(), 1, "one README row for {code}");
            let status = deny.status().as_u16().to_string();
            assert!(rows[0][2].starts_with(&status), "{code}: {:?}", rows[0]);
            assert!(
                metric_row.contains(&code),
                "{code} missing from the metric's labels"
            );
        }
    }
}
