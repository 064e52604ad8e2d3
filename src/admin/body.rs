//! Extractors for what a client sends besides credentials: a strict JSON body
//! (`JsonBody`) and a strict query string (`QueryParams`), both refusing with
//! keygate's error shape instead of axum's plain-text rejections.

use super::strict::Strict;
use super::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

/// Largest admin request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body read strictly: JSON content type, at most `LIMIT` bytes (413, and the
/// connection is closed; [`MAX_BODY_BYTES`] unless the endpoint needs more), unknown
/// fields refused (the body types say `deny_unknown_fields`), errors naming the field.
/// Put it last among a handler's arguments: it consumes the body, and credentials and
/// path are checked before it.
pub struct JsonBody<T, const LIMIT: usize = MAX_BODY_BYTES>(pub T);

impl<T: DeserializeOwned, S: Send + Sync, const LIMIT: usize> FromRequest<S>
    for JsonBody<T, LIMIT>
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        if !is_json(&parts.headers) {
            return Err(ApiError::bad_request(
                "unsupported_content_type",
                "send the body as Content-Type: application/json",
            ));
        }
        parse(&collect(body, LIMIT).await?).map(JsonBody)
    }
}

/// `application/json` or any `+json` type, parameters (such as a charset) ignored.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim();
            m.eq_ignore_ascii_case("application/json")
                || (m.len() > 5 && m[m.len() - 5..].eq_ignore_ascii_case("+json"))
        })
}

/// The whole body, refused as soon as it grows past the limit (the rest is never read).
async fn collect(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    let collected = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the body exceeds {limit} bytes"),
                )
            } else {
                ApiError::bad_request("bad_body", "the request body could not be read")
            }
        })?;
    Ok(collected.to_bytes())
}

/// Deserialize one JSON value and nothing after it, objects only where the document has
/// objects ([`Strict`]), naming the field that is wrong (`field `scopes[1]`: ...`).
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(Strict(&mut *de)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            invalid_body(inner)
        } else {
            ApiError::bad_request("invalid_body", format!("field `{path}`: {inner}"))
        }
    })?;
    de.end().map_err(invalid_body)?;
    Ok(value)
}

fn invalid_body(e: serde_json::Error) -> ApiError {
    ApiError::bad_request("invalid_body", format!("invalid body: {e}"))
}

/// A query string parsed into `T` (unknown parameters refused by `deny_unknown_fields`);
/// no query is an empty one. Values stay text in `T` so that each handler words its own
/// `parameter ...` message.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
            .map(QueryParams)
            .map_err(|e| ApiError::bad_request("invalid_query", format!("invalid query: {e}")))
    }
}
