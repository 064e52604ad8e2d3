//! `POST /v1/api-keys/import`: keys made before keygate, given as text or as the SHA-256
//! of their text, up to [`MAX_ENTRIES`] a call. The body's shape is checked as a whole
//! (as the OpenAPI document states it: 400); then each entry is imported or refused on
//! its own (`keys::import`), and the answer lists both, with warnings for keys the proxy
//! will not accept as configured (`keys.legacy`).

use super::keys::{self, check_name, check_scopes, ImportSpec, Imported, NewKeySpec};
use super::limits::{self, CreditsBody, RateLimitBody};
use super::{AdminState, ApiError, Auth, Caller, JsonBody, Write};
use crate::key::{self, Environment, KeyType, TokenKind};
use crate::time::now_ms;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Most entries one call takes.
pub const MAX_ENTRIES: usize = 1000;
/// Largest import body: 1,000 entries of about 1 KiB.
pub const MAX_IMPORT_BYTES: usize = 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportBody {
    keys: Vec<Entry>,
}

/// One key to import: exactly one of `key` and `sha256`, and create's fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    name: String,
    #[serde(default, rename = "type")]
    key_type: Option<KeyType>,
    #[serde(default)]
    environment: Option<Environment>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    ratelimits: Option<Vec<RateLimitBody>>,
    #[serde(default)]
    credits: Option<CreditsBody>,
}

#[derive(Serialize)]
pub struct Done {
    index: usize,
    id: String,
}

#[derive(Serialize)]
pub struct Failed {
    index: usize,
    code: &'static str,
    message: String,
}

#[derive(Serialize, Default)]
pub struct Answer {
    imported: usize,
    keys: Vec<Done>,
    errors: Vec<Failed>,
    warnings: Vec<Failed>,
}

pub async fn import(
    State(s): State<Arc<AdminState>>,
    Auth { caller, .. }: Auth<Write>,
    JsonBody(b): JsonBody<ImportBody, MAX_IMPORT_BYTES>,
) -> Result<Json<Answer>, ApiError> {
    if b.keys.is_empty() || b.keys.len() > MAX_ENTRIES {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!(
                "field `keys`: give 1 to {MAX_ENTRIES} keys (this call has {})",
                b.keys.len()
            ),
        ));
    }
    let now = now_ms();
    // The shape the document states (limits included) is the request's: refused whole.
    let entries = (b.keys.into_iter().enumerate())
        .map(|(i, e)| shaped(i, e, now))
        .collect::<Result<Vec<_>, _>>()?;
    let mut answer = Answer::default();
    let mut store_down: Option<String> = None;
    for (index, entry) in entries {
        let outcome = match &store_down {
            // Not tried: the store failed on an earlier entry.
            Some(e) => Err(store_error(e)),
            None => one(&s, &caller, entry, now, &mut answer.warnings, index).await,
        };
        match outcome {
            Ok(id) => answer.keys.push(Done { index, id }),
            Err(e) => {
                if e.status == StatusCode::SERVICE_UNAVAILABLE {
                    store_down.get_or_insert_with(|| e.message.clone());
                }
                answer.errors.push(Failed {
                    index,
                    code: e.code,
                    message: e.message,
                });
            }
        }
    }
    answer.imported = answer.keys.len();
    Ok(Json(answer))
}

fn store_error(message: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("not tried: {message}"),
    )
}

/// An entry with its limits checked (the parts of its shape the document states).
struct Shaped {
    entry: Entry,
    limits: crate::store::KeyLimits,
}

fn shaped(index: usize, mut entry: Entry, now: u64) -> Result<(usize, Shaped), ApiError> {
    let limits = limits::from_body(entry.ratelimits.take(), entry.credits.take(), now).map_err(
        |mut e| {
            e.message = e
                .message
                .replacen("field `", &format!("field `keys[{index}]."), 1);
            e
        },
    )?;
    Ok((index, Shaped { entry, limits }))
}

/// Import one entry: its id, or why not (a warning added when the imported key cannot
/// authenticate as configured).
async fn one(
    s: &AdminState,
    caller: &Caller,
    shaped: Shaped,
    now: u64,
    warnings: &mut Vec<Failed>,
    index: usize,
) -> Result<String, ApiError> {
    let Shaped { entry, limits } = shaped;
    let secret = secret(entry.key, entry.sha256)?;
    let name = check_name("name", &entry.name)?;
    let scopes = match entry.scopes {
        Some(sc) => check_scopes("scopes", sc)?,
        None => caller.scopes_or_all(),
    };
    let expires_at = entry.expires_at.as_deref().map(expiry).transpose()?;
    if let Some(t) = &entry.tenant {
        if !key::valid_tenant(t) {
            return Err(ApiError::bad_request(
                "invalid_tenant",
                "field `tenant`: use 1-64 characters of A-Z a-z 0-9 _ . -",
            ));
        }
    }
    let warned = warning(s, &secret);
    let spec = ImportSpec {
        secret,
        tenant: entry.tenant,
        key: NewKeySpec {
            name,
            key_type: entry.key_type.unwrap_or(KeyType::Secret),
            environment: entry.environment.unwrap_or(Environment::Live),
            scopes,
            expires_at,
            limits,
        },
    };
    let id = keys::import(s, caller, spec, now).await?.id;
    if let Some(w) = warned {
        warnings.push(Failed {
            index,
            code: "format_not_accepted",
            message: w.into(),
        });
    }
    Ok(id)
}

/// Exactly one of `key` (16 to 512 visible ASCII characters) and `sha256` (64 hex digits).
fn secret(text: Option<String>, sha256: Option<String>) -> Result<Imported, ApiError> {
    let invalid = |m: &str| ApiError::bad_request("invalid_field", m.to_string());
    match (text, sha256) {
        (Some(t), None) => {
            let visible = t.bytes().all(|b| b.is_ascii_graphic());
            if !key::LEGACY_LENGTHS.contains(&t.len()) || !visible {
                return Err(invalid(
                    "field `key`: use 16 to 512 visible ASCII characters (no spaces)",
                ));
            }
            Ok(Imported::Text(t))
        }
        (None, Some(h)) => key::unhex(&h.to_ascii_lowercase())
            .map(Imported::Sha256)
            .ok_or_else(|| invalid("field `sha256`: use 64 hex digits (the SHA-256 of the key)")),
        _ => Err(invalid("give exactly one of `key` and `sha256`")),
    }
}

/// `expires_at`: RFC 3339 in UTC (`2027-01-01T00:00:00Z`), in the future.
fn expiry(text: &str) -> Result<u64, ApiError> {
    let at = crate::time::parse_rfc3339(text).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_field",
            "field `expires_at`: use an RFC 3339 time in UTC, e.g. 2027-01-01T00:00:00Z",
        )
    })?;
    if at <= now_ms() {
        return Err(ApiError::bad_request(
            "invalid_field",
            "field `expires_at`: the time has passed",
        ));
    }
    Ok(at)
}

/// Why the proxy would refuse this key as configured, if it would.
fn warning(s: &AdminState, secret: &Imported) -> Option<&'static str> {
    let v = &s.verifier;
    match secret {
        Imported::Text(t) => match key::classify(&v.prefixes, &v.legacy, t) {
            Ok(TokenKind::Keygate | TokenKind::Legacy) => None,
            Err(_) => Some(
                "the key fits no format of keys.legacy (nor keygate's): the proxy refuses it as \
                 malformed until one is configured",
            ),
        },
        Imported::Sha256(_) if v.legacy.is_empty() => Some(
            "keys.legacy lists no format: a key imported by hash authenticates only once its \
             format is configured",
        ),
        Imported::Sha256(_) => None,
    }
}
