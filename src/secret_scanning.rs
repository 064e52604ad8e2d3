//! The secret-scanning listener (off unless `secret_scanning` is configured; never the
//! proxy's or the admin's port): `POST /v1/secret-scanning` and `POST /` take a scanner's
//! report of leaked tokens in GitHub's partner format, signed with ECDSA P-256 over the
//! raw body. Each live keygate key in it is revoked through the key service (so every
//! replica refuses it within the change feed's milliseconds) or only reported, with an
//! audit event (`keygate::audit`); the answer labels each token by its SHA-256.
//! A report that is unsigned, signed by an unknown key or badly signed is 401 and
//! changes nothing.

use crate::admin::{keys, AdminState, ApiError, Caller};
use crate::config::{ScanAction, ScanKey};
use crate::key;
use crate::store::KeyRecord;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use http_body_util::BodyExt;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::Signature;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Largest report body read (the rest is never read).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most tokens in one report.
pub const MAX_TOKENS: usize = 1000;
/// Whole-request deadline: reading the body, checking the signature, every lookup and
/// revocation. A report cut short answers 503 and the scanner sends it again (each step
/// is safe to repeat).
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Characters of `url`, `source` and `type` that go into an audit event.
const MAX_LOGGED_CHARS: usize = 512;

const KEY_IDENTIFIER: &str = "github-public-key-identifier";
const SIGNATURE: &str = "github-public-key-signature";

/// What the listener needs: the key service's state, the scanner's keys, the action.
pub struct Scanner {
    pub admin: Arc<AdminState>,
    pub public_keys: Vec<ScanKey>,
    pub action: ScanAction,
}

/// The listener's routes; anything else is 404 (405 for another method).
pub fn router(scanner: Arc<Scanner>) -> Router {
    Router::new()
        .route("/v1/secret-scanning", post(report))
        .route("/", post(report))
        .fallback(not_found)
        .with_state(scanner)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "POST reports to /v1/secret-scanning",
    )
}

/// One reported token, as the scanner sends it (other fields are ignored).
#[derive(Deserialize)]
struct Reported {
    token: String,
    #[serde(rename = "type", default)]
    token_type: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

/// The answer for one token.
#[derive(Serialize)]
struct Labelled {
    token_hash: String,
    token_type: String,
    label: &'static str,
}

/// Why a whole report was refused: its metric reason and its answer.
enum Refusal {
    Unsigned,
    UnknownKeyIdentifier,
    BadSignature,
    TooLarge,
    InvalidBody(String),
    Timeout,
    /// The key service could not do its part (store down, ...): answered as it says.
    Service(ApiError),
}

impl Refusal {
    fn reason(&self) -> Option<&'static str> {
        Some(match self {
            Refusal::Unsigned => "unsigned",
            Refusal::UnknownKeyIdentifier => "unknown_key_identifier",
            Refusal::BadSignature => "bad_signature",
            Refusal::TooLarge => "too_large",
            Refusal::InvalidBody(_) => "invalid_body",
            Refusal::Timeout => "timeout",
            Refusal::Service(_) => return None,
        })
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        let unauthorized = |code, message| ApiError::new(StatusCode::UNAUTHORIZED, code, message);
        match r {
            Refusal::Unsigned => unauthorized(
                "signature_missing",
                "send GITHUB-PUBLIC-KEY-IDENTIFIER and GITHUB-PUBLIC-KEY-SIGNATURE, once each",
            ),
            Refusal::UnknownKeyIdentifier => unauthorized(
                "signature_key_unknown",
                "GITHUB-PUBLIC-KEY-IDENTIFIER names no configured public key",
            ),
            Refusal::BadSignature => unauthorized(
                "signature_invalid",
                "the signature does not verify over the body",
            ),
            Refusal::TooLarge => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body exceeds {MAX_BODY_BYTES} bytes"),
            ),
            Refusal::InvalidBody(m) => ApiError::bad_request("invalid_body", m),
            Refusal::Timeout => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!("the report took longer than {DEADLINE:?}; send it again"),
            ),
            Refusal::Service(e) => e,
        }
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Refusal {
        Refusal::Service(e)
    }
}

/// The handler: the whole report within `DEADLINE`, refusals counted and answered once.
async fn report(State(s): State<Arc<Scanner>>, headers: HeaderMap, body: Body) -> Response {
    let answer = tokio::time::timeout(DEADLINE, s.handle(&headers, body))
        .await
        .unwrap_or(Err(Refusal::Timeout));
    match answer {
        Ok(labelled) => Json(labelled).into_response(),
        Err(refusal) => {
            if let Some(reason) = refusal.reason() {
                s.admin.metrics.scanning.refused(reason);
                tracing::warn!(reason, "secret-scanning report refused");
            }
            ApiError::from(refusal).into_response()
        }
    }
}

impl Scanner {
    /// Signature first (the key before the body is read), then the tokens in order.
    async fn handle(&self, headers: &HeaderMap, body: Body) -> Result<Vec<Labelled>, Refusal> {
        let (key, signature) = self.signer(headers)?;
        let body = collect(body).await?;
        key.key
            .verify(&body, &signature)
            .map_err(|_| Refusal::BadSignature)?;
        let reported = parse(&body)?;
        let mut labelled = Vec::with_capacity(reported.len());
        for r in reported {
            labelled.push(self.judge(r).await?);
        }
        Ok(labelled)
    }

    /// The configured key the headers name, and the signature they carry.
    fn signer(&self, headers: &HeaderMap) -> Result<(&ScanKey, Signature), Refusal> {
        let identifier = one_header(headers, KEY_IDENTIFIER)?;
        let signature = one_header(headers, SIGNATURE)?;
        let key = (self.public_keys.iter())
            .find(|k| k.identifier == identifier)
            .ok_or(Refusal::UnknownKeyIdentifier)?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .map_err(|_| Refusal::BadSignature)?;
        let signature = Signature::from_der(&der).map_err(|_| Refusal::BadSignature)?;
        Ok((key, signature))
    }

    /// One token: label, act, audit, count.
    async fn judge(&self, r: Reported) -> Result<Labelled, Refusal> {
        let outcome = self.act(&r.token).await?;
        audit(&r, &outcome);
        let (label, action) = (outcome.label(), outcome.action());
        self.admin.metrics.scanning.token(label, action);
        Ok(Labelled {
            token_hash: key::hex(&key::sha256(r.token.as_bytes())),
            token_type: r.token_type.unwrap_or_default(),
            label,
        })
    }

    /// Look the token up as the proxy would (format first, no I/O for junk; then its
    /// digest in the store itself, not a cache that may lag), and revoke a live key
    /// through the key service when the action says so.
    async fn act(&self, token: &str) -> Result<Outcome, ApiError> {
        let verifier = &self.admin.verifier;
        if key::parse(&verifier.prefixes, token).is_err() {
            return Ok(Outcome::NotKeygate);
        }
        let digest = verifier.hasher.digest(token);
        let record = match self.admin.store.by_digest(&digest).await? {
            Some(r) if key::ct_eq(&r.digest, &digest) => r,
            _ => return Ok(Outcome::Unknown),
        };
        let done = match self.action {
            ScanAction::Report => Done::Reported,
            ScanAction::Revoke if record.is_revoked_at(crate::time::now_ms()) => {
                Done::AlreadyRevoked
            }
            ScanAction::Revoke => match self.revoke(&record).await {
                Err(e) if e.status == StatusCode::NOT_FOUND => return Ok(Outcome::Unknown),
                other => other.map(|_| Done::Revoked)?,
            },
        };
        Ok(Outcome::Found(Box::new(record), done))
    }

    /// The admin API's own revoke, acting in the key's tenant with every scope (the
    /// signed report is the authority): store write, change feed, local cache.
    async fn revoke(&self, record: &KeyRecord) -> Result<KeyRecord, ApiError> {
        let caller = Caller {
            tenant: record.tenant.clone(),
            key_scopes: None,
        };
        let id = keys::KeyId::parse(&record.id)?;
        keys::revoke(&self.admin, &caller, &id).await
    }
}

/// What a reported token turned out to be, and what was done.
enum Outcome {
    /// Not keygate's key format (or a wrong checksum): never looked up.
    NotKeygate,
    /// keygate's format, but no key of this keygate.
    Unknown,
    Found(Box<KeyRecord>, Done),
}

enum Done {
    Revoked,
    AlreadyRevoked,
    Reported,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Found(..) => "true_positive",
            Outcome::NotKeygate | Outcome::Unknown => "false_positive",
        }
    }

    /// One of `metrics::SCAN_ACTIONS`.
    fn action(&self) -> &'static str {
        match self {
            Outcome::Found(_, Done::Revoked) => "revoked",
            Outcome::Found(_, Done::AlreadyRevoked) => "already_revoked",
            Outcome::Found(_, Done::Reported) => "reported",
            Outcome::NotKeygate | Outcome::Unknown => "none",
        }
    }
}

/// The audit event of one token: the key's id, tenant and display prefix (never the
/// token), where the scanner saw it, and what was done. Text fields are passed as `&str`,
/// which the log formats quote and escape, and are clipped.
fn audit(r: &Reported, outcome: &Outcome) {
    let url = clip(r.url.as_deref().unwrap_or(""));
    let source = clip(r.source.as_deref().unwrap_or(""));
    let token_type = clip(r.token_type.as_deref().unwrap_or(""));
    let (label, action) = (outcome.label(), outcome.action());
    match outcome {
        Outcome::Found(record, _) => tracing::warn!(
            target: "keygate::audit",
            event = "secret_scanning",
            label,
            action,
            key_id = record.id.as_str(),
            tenant = record.tenant.as_str(),
            prefix = record.prefix.as_str(),
            token_type,
            url,
            source,
            "a secret scanner reported a leaked key"
        ),
        Outcome::NotKeygate | Outcome::Unknown => tracing::info!(
            target: "keygate::audit",
            event = "secret_scanning",
            label,
            action,
            token_type,
            url,
            source,
            "a secret scanner reported a token that is no key of this keygate"
        ),
    }
}

/// At most `MAX_LOGGED_CHARS` characters of `s`.
fn clip(s: &str) -> &str {
    s.char_indices()
        .nth(MAX_LOGGED_CHARS)
        .map_or(s, |(end, _)| &s[..end])
}

/// The one value of header `name`: missing, repeated or not text is unsigned.
fn one_header<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, Refusal> {
    let mut all = headers.get_all(name).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => v.to_str().map(str::trim).map_err(|_| Refusal::Unsigned),
        _ => Err(Refusal::Unsigned),
    }
}

/// The whole body, refused as soon as it grows past `MAX_BODY_BYTES`.
async fn collect(body: Body) -> Result<bytes::Bytes, Refusal> {
    match http_body_util::Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::TooLarge),
        Err(_) => Err(Refusal::InvalidBody(
            "the request body could not be read".into(),
        )),
    }
}

/// The signed body: a JSON array of at most `MAX_TOKENS` reported tokens.
fn parse(body: &[u8]) -> Result<Vec<Reported>, Refusal> {
    let reported: Vec<Reported> = crate::admin::strict::from_slice(body).map_err(|e| {
        Refusal::InvalidBody(format!(
            "invalid body: {e}; send a JSON array of {{\"token\", \"type\", \"url\", \"source\"}}"
        ))
    })?;
    if reported.len() > MAX_TOKENS {
        return Err(Refusal::InvalidBody(format!(
            "{} tokens in one report; send at most {MAX_TOKENS}",
            reported.len()
        )));
    }
    Ok(reported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_char_boundaries() {
        let long = "é".repeat(MAX_LOGGED_CHARS + 10);
        assert_eq!(clip(&long).chars().count(), MAX_LOGGED_CHARS);
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn hostile_bodies_are_refused_not_panicked_on() {
        for body in [
            &b""[..],
            b"{}",
            b"[{}]",
            b"[{\"token\": 5}]",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"\xff\xfe",
            b"null",
        ] {
            assert!(matches!(parse(body), Err(Refusal::InvalidBody(_))));
        }
        let many = format!("[{}]", vec!["{\"token\":\"x\"}"; MAX_TOKENS + 1].join(","));
        assert!(matches!(
            parse(many.as_bytes()),
            Err(Refusal::InvalidBody(_))
        ));
        let ok = parse(br#"[{"token":"t","type":"x","url":null,"extra":1}]"#);
        assert!(ok.is_ok_and(|r| r.len() == 1 && r[0].url.is_none()));
    }

    #[test]
    fn every_refusal_maps_to_its_answer_and_a_counted_reason() {
        for (r, status) in [
            (Refusal::Unsigned, 401),
            (Refusal::UnknownKeyIdentifier, 401),
            (Refusal::BadSignature, 401),
            (Refusal::TooLarge, 413),
            (Refusal::InvalidBody("x".into()), 400),
            (Refusal::Timeout, 503),
        ] {
            let reason = r.reason().expect("a reason");
            assert!(crate::metrics::SCAN_REFUSALS.contains(&reason));
            assert_eq!(ApiError::from(r).status.as_u16(), status, "{reason}");
        }
    }
}
