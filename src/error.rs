//! keygate's own answers on the proxy port: every refusal is a `Deny`, and `Deny::response`
//! is the one place that turns it into a status, a stable JSON code and RFC 6750 headers.

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

const CHALLENGE: HeaderValue = HeaderValue::from_static("Bearer realm=\"keygate\"");
const INVALID_TOKEN: HeaderValue =
    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"invalid_token\"");
const INVALID_REQUEST: HeaderValue =
    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"invalid_request\"");
const INSUFFICIENT: HeaderValue =
    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"insufficient_scope\"");

/// Every reason keygate answers a proxied request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    InsufficientScope(HeaderValue),
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

    fn message(&self) -> &'static str {
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
            InsufficientScope(v) => Some(v.clone()),
            _ => None,
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

    /// The decision table of the README, pinned.
    #[test]
    fn mapping() {
        let scope = HeaderValue::from_static(
            "Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"users:read\"",
        );
        let table: &[(Deny, u16, &str, Option<&str>)] = &[
            (
                Deny::MissingKey,
                401,
                "missing_key",
                Some("Bearer realm=\"keygate\""),
            ),
            (
                Deny::MalformedKey,
                401,
                "malformed_key",
                Some("Bearer realm=\"keygate\", error=\"invalid_token\""),
            ),
            (
                Deny::UnknownKey,
                401,
                "unknown_key",
                Some("Bearer realm=\"keygate\", error=\"invalid_token\""),
            ),
            (
                Deny::ExpiredKey,
                401,
                "expired_key",
                Some("Bearer realm=\"keygate\", error=\"invalid_token\""),
            ),
            (
                Deny::RevokedKey,
                403,
                "revoked_key",
                Some("Bearer realm=\"keygate\", error=\"invalid_token\""),
            ),
            (
                Deny::PublishableNotAllowed,
                403,
                "publishable_key_not_allowed",
                Some("Bearer realm=\"keygate\", error=\"insufficient_scope\""),
            ),
            (
                Deny::InsufficientScope(scope),
                403,
                "insufficient_scope",
                Some(
                    "Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"users:read\"",
                ),
            ),
            (
                Deny::MultipleAuthorization,
                400,
                "multiple_authorization",
                Some("Bearer realm=\"keygate\", error=\"invalid_request\""),
            ),
            (Deny::NoRoute, 404, "no_route", None),
            (Deny::BadPath, 400, "bad_path", None),
            (Deny::BadHost, 400, "bad_host", None),
            (Deny::BadRequestBody, 400, "bad_request_body", None),
            (Deny::BadMethod, 400, "bad_method", None),
            (Deny::RequestTimeout, 408, "request_timeout", None),
            (Deny::TooManyHeaders, 431, "too_many_headers", None),
            (Deny::StoreUnavailable, 503, "store_unavailable", None),
            (Deny::UpstreamUnavailable, 502, "upstream_unavailable", None),
            (Deny::UpstreamTimeout, 504, "upstream_timeout", None),
        ];
        for (deny, status, code, challenge) in table {
            let r = deny.response();
            assert_eq!(r.status().as_u16(), *status, "{code}");
            assert_eq!(deny.code(), *code);
            assert_eq!(
                r.headers()
                    .get(WWW_AUTHENTICATE)
                    .map(|v| v.to_str().unwrap()),
                *challenge,
                "{code}"
            );
        }
    }
}
