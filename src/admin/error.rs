//! The admin API's one error shape, `{"error": {"code", "message"}}`, and the one place
//! that turns it (and every store error) into an HTTP answer.

use crate::store::StoreError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An admin API error: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn key_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "key_not_found", "no such key")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::BadCursor => {
                ApiError::bad_request("invalid_cursor", "field `cursor`: invalid cursor")
            }
            StoreError::Conflict => {
                ApiError::new(StatusCode::CONFLICT, "conflict", "the key already exists")
            }
            StoreError::NotRotatable => ApiError::new(
                StatusCode::CONFLICT,
                "key_not_rotatable",
                "the key is revoked or expired and cannot be rotated",
            ),
            StoreError::AlreadyRotated => ApiError::new(
                StatusCode::CONFLICT,
                "key_already_rotated",
                "the key already has a successor (rotation in progress); rotate the new key instead",
            ),
            StoreError::Revoked => ApiError::new(
                StatusCode::CONFLICT,
                "key_revoked",
                "a revoked key cannot be changed",
            ),
            StoreError::Unconfirmed { acked, wanted } => {
                tracing::warn!(acked, wanted, "a key change was not confirmed by enough Redis replicas");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "replication_unconfirmed",
                    format!("the change was written but only {acked} of {wanted} Redis replicas confirmed it in time: it may or may not have applied (a failover now could lose it); retrying is safe"),
                )
            }
            other => {
                tracing::error!(error = %other, "key store error in admin API");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the key store is unavailable; retry shortly",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        let challenge = match (self.status, self.code) {
            // The secret-scanning listener's: a signature scheme, not a bearer one.
            (StatusCode::UNAUTHORIZED, code) if code.starts_with("signature_") => None,
            (StatusCode::UNAUTHORIZED, "missing_key" | "unsupported_auth_scheme") => {
                Some("Bearer realm=\"keygate-admin\"")
            }
            (StatusCode::UNAUTHORIZED, _) => {
                Some("Bearer realm=\"keygate-admin\", error=\"invalid_token\"")
            }
            (StatusCode::FORBIDDEN, "insufficient_scope") => {
                Some("Bearer realm=\"keygate-admin\", error=\"insufficient_scope\"")
            }
            _ => None,
        };
        if let Some(c) = challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is not read: the connection cannot be reused.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
