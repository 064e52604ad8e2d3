//! The one key service behind both admin documents: create, import, get, list, update,
//! revoke and rotate a key in the caller's tenant (store write, cache invalidation, log line),
//! plus the field checks both documents share. `jack.rs` and `hellojohn.rs` only
//! translate their document's shapes into these calls.

use super::{AdminState, ApiError, Caller};
use crate::key::{self, Environment, KeyType, NewKey};
use crate::store::{order_key, KeyLimits, KeyRecord, KeyUpdate, Page, PageRequest, StoreError};
use crate::time::now_ms;
use axum::http::StatusCode;
use std::ops::RangeInclusive;

/// Largest page either document lets a client ask for.
pub const MAX_LIMIT: usize = 1000;
/// Store pages read per filtered list call when filters skip many keys (then the next
/// cursor lets the client continue).
const MAX_SCAN_PAGES: usize = 10;
const DAY_MS: u64 = 86_400_000;
const MINUTE_MS: u64 = 60_000;

/// A key id from a path or body: one of our ids (a UUID), else simply not found.
#[derive(Debug, Clone)]
pub struct KeyId(String);

impl KeyId {
    pub fn parse(id: &str) -> Result<Self, ApiError> {
        uuid::Uuid::try_parse(id)
            .map(|_| KeyId(id.to_string()))
            .map_err(|_| ApiError::key_not_found())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Check a human label: 1-200 characters, no control characters.
pub fn check_name(field: &'static str, name: &str) -> Result<String, ApiError> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.chars().count() > 200 {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("field `{field}`: must be 1 to 200 characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("field `{field}`: control characters are not allowed"),
        ));
    }
    Ok(trimmed.to_string())
}

/// Check a scope list: well-formed, at most 64, duplicates dropped, order kept.
pub fn check_scopes(field: &'static str, scopes: Vec<String>) -> Result<Vec<String>, ApiError> {
    if scopes.is_empty() || scopes.len() > 64 {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("field `{field}`: give 1 to 64 scopes"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for (i, s) in scopes.into_iter().enumerate() {
        if !key::valid_scope(&s) {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!(
                    "field `{field}[{i}]`: invalid scope {s:?}: use `*` or lowercase words joined by `:`"
                ),
            ));
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// The units an admin API duration may have (`w`: 7 days, `y`: 365.25 days, as
/// `time::parse_duration` counts them).
pub const DURATION_UNITS: [&str; 6] = ["s", "m", "h", "d", "w", "y"];

/// A duration as the admin API shows it: a whole number of the largest unit that gives
/// it exactly (`86400000` is `1d`, `90000` is `90s`), which `time::parse_duration` reads
/// back as the same value; one of [`DURATION_UNITS`] for whole seconds (every duration a
/// client can set), else milliseconds (`1500ms`).
pub fn duration_text(ms: u64) -> String {
    const UNITS: [(&str, u64); 6] = [
        ("y", 31_557_600_000),
        ("w", 7 * DAY_MS),
        ("d", DAY_MS),
        ("h", 3_600_000),
        ("m", MINUTE_MS),
        ("s", 1_000),
    ];
    match UNITS.iter().find(|(_, unit)| ms != 0 && ms % unit == 0) {
        Some((name, unit)) => format!("{}{name}", ms / unit),
        None if ms == 0 => "0s".to_string(),
        None => format!("{ms}ms"),
    }
}

/// A duration field of a request body: a whole number and one of [`DURATION_UNITS`]
/// (`90d`, `0s`; no sign, space, fraction, leading zero or second unit) within a range,
/// valued by `time::parse_duration`. Narrower than the config files' syntax (`1h 30m`,
/// `1.5h`, ` 2 hours`) so that the OpenAPI document's `pattern` for the field can say
/// exactly which strings are accepted: the tests below hold the two together.
pub struct DurationField {
    pub field: &'static str,
    /// Allowed values in milliseconds.
    pub range_ms: RangeInclusive<u64>,
    /// Shown after "use e.g." when the text is not an allowed duration.
    pub examples: &'static str,
    /// Said when the value is above the range; `None`: refused as an invalid duration
    /// like any other (the documents word this differently, and clients see it).
    pub above: Option<&'static str>,
    /// Said when the value is below the range; `None`: refused as an invalid duration.
    pub below: Option<&'static str>,
}

/// `expires_in` on create (both documents): `90d`, `12h`, `1y`, positive, at most 100 years.
pub const EXPIRES_IN: DurationField = DurationField {
    field: "expires_in",
    range_ms: 1..=100 * 366 * DAY_MS,
    examples: "12h, 90d, 1y",
    above: None,
    below: None,
};

/// `grace_period` of a rotation (HelloJohn): `0s` (at once) to 366 days.
pub const GRACE_PERIOD: DurationField = DurationField {
    field: "grace_period",
    range_ms: 0..=366 * DAY_MS,
    examples: "0s, 1h, 24h",
    above: Some("at most 366d"),
    below: None,
};

/// A rate limit's `duration` (both documents, `ratelimits[i].duration`): 1s to 366 days.
pub const RATELIMIT_DURATION: DurationField = DurationField {
    field: "duration",
    range_ms: 1_000..=366 * DAY_MS,
    examples: "1s, 1m, 1h, 1d",
    above: Some("at most 366d"),
    below: Some("at least 1s"),
};

/// The `interval` of a credits refill (`credits.refill.interval`): 1 minute to 366 days.
pub const REFILL_INTERVAL: DurationField = DurationField {
    field: "interval",
    range_ms: MINUTE_MS..=366 * DAY_MS,
    examples: "1h, 1d, 30d",
    above: Some("at most 366d"),
    below: Some("at least 1m"),
};

/// `unused_for` of both list calls (`90d`): the same values as `expires_in`.
pub const UNUSED_FOR: DurationField = DurationField {
    field: "unused_for",
    range_ms: 1..=100 * 366 * DAY_MS,
    examples: "30d, 90d, 1y",
    above: None,
    below: None,
};

/// The `unused_for` query parameter of a list call, checked: the cut-off instant
/// (`now` minus the duration), refused like the other query parameters (`invalid_query`).
pub fn unused_cutoff(text: Option<&str>, now: u64) -> Result<Option<u64>, ApiError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let ms = UNUSED_FOR.parse(text).map_err(|e| {
        let message = e.message.replacen("field `", "parameter `", 1);
        ApiError::bad_request("invalid_query", message)
    })?;
    Ok(Some(now.saturating_sub(ms)))
}

/// Is the key dormant at `cutoff`: last used before it, or never used and created
/// before it (a key made yesterday and not used yet is not dormant for `30d`).
pub fn unused_since(r: &KeyRecord, cutoff: u64) -> bool {
    r.last_used_at.unwrap_or(r.created_at) < cutoff
}

impl DurationField {
    /// The value in milliseconds, or `invalid_field` naming the field.
    pub fn parse(&self, text: &str) -> Result<u64, ApiError> {
        self.parse_at(self.field, text)
    }

    /// `parse` for the field at `field` (a path such as `ratelimits[1].duration`).
    pub fn parse_at(&self, field: &str, text: &str) -> Result<u64, ApiError> {
        let invalid = || {
            ApiError::bad_request(
                "invalid_field",
                format!(
                    "field `{field}`: invalid duration {text:?}; use a whole number and one \
                     unit of s, m, h, d, w, y, e.g. {}",
                    self.examples
                ),
            )
        };
        let (number, unit) = text.split_at(text.bytes().take_while(u8::is_ascii_digit).count());
        let canonical = number == "0" || (!number.is_empty() && !number.starts_with('0'));
        if !canonical || !DURATION_UNITS.contains(&unit) {
            return Err(invalid());
        }
        // Within this syntax `time::parse_duration` fails only on overflow: like a value
        // beyond u64 milliseconds, simply too long.
        let ms = crate::time::parse_duration(text)
            .ok()
            .and_then(|d| u64::try_from(d.as_millis()).ok());
        let said =
            |what: &str| ApiError::bad_request("invalid_field", format!("field `{field}`: {what}"));
        match ms {
            Some(ms) if self.range_ms.contains(&ms) => Ok(ms),
            Some(ms) if ms < *self.range_ms.start() => Err(self.below.map_or_else(invalid, said)),
            _ => Err(self.above.map_or_else(invalid, said)),
        }
    }
}

/// The optional `scopes` and `expires_in` of a create request, checked: scopes default
/// to the caller's own; `expires_in` becomes an absolute expiry.
pub fn scopes_and_expiry(
    caller: &Caller,
    scopes: Option<Vec<String>>,
    expires_in: Option<&str>,
) -> Result<(Vec<String>, Option<u64>), ApiError> {
    let scopes = match scopes {
        Some(sc) => check_scopes("scopes", sc)?,
        None => caller.scopes_or_all(),
    };
    let expires_at = expires_in
        .map(|e| EXPIRES_IN.parse(e))
        .transpose()?
        .map(|ms| now_ms() + ms);
    Ok((scopes, expires_at))
}

/// The page a list call asks for: `limit` (text as sent, 1 to [`MAX_LIMIT`], else
/// `default_limit`) and the opaque `cursor` (the store checks it).
pub fn page_request(
    limit: Option<&str>,
    cursor: Option<String>,
    default_limit: usize,
) -> Result<PageRequest, ApiError> {
    let limit = match limit {
        None => default_limit,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("parameter `limit`: use 1 to {MAX_LIMIT}"),
                ))
            }
        },
    };
    Ok(PageRequest { limit, cursor })
}

/// What to create; shared by both API surfaces and by rotation.
pub struct NewKeySpec {
    pub name: String,
    pub key_type: KeyType,
    pub environment: Environment,
    pub scopes: Vec<String>,
    pub expires_at: Option<u64>,
    /// Rate limits and credits (`admin::limits` checks them); on create, `credits.set_at`
    /// is the creation time.
    pub limits: KeyLimits,
}

pub fn escalation() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "scope_escalation",
        "field `scopes`: a key cannot hand out scopes it does not hold",
    )
}

/// Fresh key text from the OS CSPRNG and the record for it in `tenant` (not stored yet).
fn mint(
    s: &AdminState,
    tenant: &str,
    spec: NewKeySpec,
    created_at: u64,
) -> Result<(KeyRecord, NewKey), ApiError> {
    let new =
        key::generate(&s.verifier.prefixes, spec.key_type, spec.environment).map_err(|e| {
            tracing::error!(error = %e, "OS random number generator failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "key generation failed",
            )
        })?;
    let record = KeyRecord {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: tenant.to_string(),
        name: spec.name,
        key_type: spec.key_type,
        environment: spec.environment,
        prefix: new.display_prefix(),
        last_four: new.last_four(),
        scopes: spec.scopes,
        created_at,
        last_used_at: None,
        expires_at: spec.expires_at,
        revoked_at: None,
        successor_id: None,
        digest: s.verifier.hasher.digest(&new.text),
        limits: spec.limits,
        plain_sha256: false,
    };
    Ok((record, new))
}

/// Create a key in the caller's tenant at `now` (the credits' `set_at`). The full key
/// text leaves only in the result.
pub async fn create(
    s: &AdminState,
    caller: &Caller,
    spec: NewKeySpec,
    now: u64,
) -> Result<(KeyRecord, NewKey), ApiError> {
    if !caller.may_grant(&spec.scopes) {
        return Err(escalation());
    }
    let (record, new) = mint(s, &caller.tenant, spec, now)?;
    s.store.insert(&record).await?;
    // A create must clear a cached "unknown" for this digest.
    s.verifier.cache.invalidate(&record.digest).await;
    tracing::info!(id = %record.id, tenant = %record.tenant, prefix = %record.prefix, "key created");
    Ok((record, new))
}

/// An imported key's secret: its text, or only the SHA-256 of its text.
pub enum Imported {
    Text(String),
    Sha256(key::Digest),
}

/// What an imported key's entry asks for; `tenant` `None` is the caller's.
pub struct ImportSpec {
    pub secret: Imported,
    pub tenant: Option<String>,
    pub key: NewKeySpec,
}

/// The refusal of an entry whose key is stored already.
pub fn duplicate_key() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "duplicate_key",
        "a key with this text (digest) exists already; it was left unchanged",
    )
}

/// Import a key made elsewhere, with the create path's checks (scopes the caller holds,
/// the caller's tenant: only the root token names another). The store's insert creates
/// the record only if its digest is new (atomically), so a duplicate never overwrites.
/// A key given as text gets the usual (peppered) digest; one given by SHA-256 keeps it,
/// marked `plain_sha256`. With a pepper, a text whose plain SHA-256 was imported before
/// is refused too (two records of one key; checked before the insert, not atomically).
pub async fn import(
    s: &AdminState,
    caller: &Caller,
    spec: ImportSpec,
    now: u64,
) -> Result<KeyRecord, ApiError> {
    if !caller.may_grant(&spec.key.scopes) {
        return Err(escalation());
    }
    let tenant = match spec.tenant {
        Some(t) if caller.key_scopes.is_some() && t != caller.tenant => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "tenant_mismatch",
                "field `tenant`: a key imports only into its own tenant",
            ))
        }
        Some(t) => t,
        None => caller.tenant.clone(),
    };
    let hasher = &s.verifier.hasher;
    let (digest, plain_sha256, (prefix, last_four)) = match &spec.secret {
        Imported::Text(text) => {
            if hasher.is_peppered() {
                let plain = s.store.by_digest(&key::sha256(text.as_bytes())).await?;
                if plain.is_some_and(|r| r.plain_sha256) {
                    return Err(duplicate_key());
                }
            }
            (hasher.digest(text), false, shown(text, &s.verifier.legacy))
        }
        Imported::Sha256(d) => (*d, true, (String::new(), String::new())),
    };
    let record = KeyRecord {
        id: uuid::Uuid::now_v7().to_string(),
        tenant,
        name: spec.key.name,
        key_type: spec.key.key_type,
        environment: spec.key.environment,
        prefix,
        last_four,
        scopes: spec.key.scopes,
        created_at: now,
        last_used_at: None,
        expires_at: spec.key.expires_at,
        revoked_at: None,
        successor_id: None,
        digest,
        limits: spec.key.limits,
        plain_sha256,
    };
    match s.store.insert(&record).await {
        Err(StoreError::Conflict) => return Err(duplicate_key()),
        other => other?,
    }
    // As for a create: clear a cached "unknown" for this digest.
    s.verifier.cache.invalidate(&record.digest).await;
    tracing::info!(id = %record.id, tenant = %record.tenant, prefix = %record.prefix, by_hash = plain_sha256, "key imported");
    Ok(record)
}

/// The display prefix and last characters of an imported key's (visible ASCII) text:
/// its legacy format's prefix, and of the rest at most an eighth (up to 4) at each end,
/// so a short key is never mostly shown.
fn shown(text: &str, legacy: &key::LegacyFormats) -> (String, String) {
    let prefix = legacy.find(text).map_or(0, |f| f.prefix.len());
    let n = ((text.len() - prefix) / 8).min(key::DISPLAY_BODY_CHARS);
    let head = text.get(..prefix + n).unwrap_or_default();
    let tail = text.get(text.len() - n..).unwrap_or_default();
    (head.to_string(), tail.to_string())
}

/// Get one key of the caller's tenant.
pub async fn get(s: &AdminState, caller: &Caller, id: &KeyId) -> Result<KeyRecord, ApiError> {
    s.store
        .by_id(&caller.tenant, id.as_str())
        .await?
        .ok_or_else(ApiError::key_not_found)
}

/// One store page of the caller's tenant, newest first.
pub async fn list(s: &AdminState, caller: &Caller, page: &PageRequest) -> Result<Page, ApiError> {
    Ok(s.store.list(&caller.tenant, page).await?)
}

/// Up to `page.limit` keys of the caller's tenant that `keep` accepts, newest first,
/// reading at most `MAX_SCAN_PAGES` store pages; `next_cursor` continues after the last
/// key returned (or after the last one read, when the scan stopped early).
pub async fn scan(
    s: &AdminState,
    caller: &Caller,
    page: PageRequest,
    keep: impl Fn(&KeyRecord) -> bool,
) -> Result<Page, ApiError> {
    let PageRequest { limit, mut cursor } = page;
    let mut items = Vec::new();
    let mut next_cursor = None;
    for _ in 0..MAX_SCAN_PAGES {
        let req = PageRequest {
            limit,
            cursor: cursor.clone(),
        };
        let page = s.store.list(&caller.tenant, &req).await?;
        let n = page.items.len();
        for (i, r) in page.items.into_iter().enumerate() {
            if keep(&r) {
                items.push(r);
            }
            if items.len() == limit {
                let more = i + 1 < n || page.next_cursor.is_some();
                let next_cursor = more.then(|| items.last().map(order_key)).flatten();
                return Ok(Page { items, next_cursor });
            }
        }
        match page.next_cursor {
            Some(c) => {
                next_cursor = Some(c.clone());
                cursor = Some(c);
            }
            None => {
                next_cursor = None;
                break;
            }
        }
    }
    Ok(Page { items, next_cursor })
}

/// Change name, scopes, rate limits and/or credits. No separate read first: the store
/// refuses a key revoked by `now` in the same atomic step as the write (a read-then-write
/// let a revoke land in between and the change succeed for a revoked key). A revoke
/// stamped after `now` orders after this change, so an answer built with the same `now`
/// never shows `revoked`.
pub async fn update(
    s: &AdminState,
    caller: &Caller,
    id: &KeyId,
    change: &KeyUpdate,
    now: u64,
) -> Result<KeyRecord, ApiError> {
    if let Some(sc) = &change.scopes {
        if !caller.may_grant(sc) {
            return Err(escalation());
        }
    }
    // New credits are a new counter: the old one is let go once every key has moved on.
    let before = match change.credits {
        Some(_) => s.store.by_id(&caller.tenant, id.as_str()).await?,
        None => None,
    };
    let r = s
        .store
        .update(&caller.tenant, id.as_str(), change, now)
        .await?
        .ok_or_else(ApiError::key_not_found)?;
    // The proxy enforces the new scopes at once.
    s.verifier.cache.invalidate(&r.digest).await;
    tracing::info!(id = %r.id, tenant = %r.tenant, prefix = %r.prefix, "key updated");
    if change.ratelimits.is_some() || change.credits.is_some() {
        share_limits(s, &r, change, now).await?;
    }
    if let Some(before) = &before {
        super::limits::retire_credits(s, before, &r).await;
    }
    Ok(r)
}

/// Rotations that one key's limits and credits follow, at most: a longer chain's oldest
/// keys are long revoked (each rotation's grace is at most 366 days).
const MAX_CHAIN: usize = 1_000;

/// Give the same limits and credits (the same `set_at`, so the same counters) to every
/// other key still working that spends `r`'s budget: the keys of its rotation chain
/// share one budget, and a change made through one of them binds them all. A key never
/// rotated reads nothing more.
async fn share_limits(
    s: &AdminState,
    r: &KeyRecord,
    change: &KeyUpdate,
    now: u64,
) -> Result<(), ApiError> {
    let limits_only = KeyUpdate {
        ratelimits: change.ratelimits.clone(),
        credits: change.credits.clone(),
        ..KeyUpdate::default()
    };
    let mut next = Some(r.limits.budget.clone().unwrap_or_else(|| r.id.clone()));
    for _ in 0..MAX_CHAIN {
        let Some(id) = next.take() else { break };
        if id == r.id {
            next.clone_from(&r.successor_id);
            continue;
        }
        let Some(k) = s.store.by_id(&r.tenant, &id).await? else {
            break;
        };
        next.clone_from(&k.successor_id);
        if k.is_revoked_at(now) {
            continue;
        }
        match s.store.update(&r.tenant, &k.id, &limits_only, now).await {
            Ok(Some(after)) => {
                s.verifier.cache.invalidate(&after.digest).await;
                tracing::info!(id = %after.id, from = %r.id, "key's limits updated with its rotation's");
            }
            // Revoked or gone since it was read: nothing left to bind.
            Ok(None) | Err(StoreError::Revoked) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Revoke in the caller's tenant (idempotent) and evict it from this process's cache.
pub async fn revoke(s: &AdminState, caller: &Caller, id: &KeyId) -> Result<KeyRecord, ApiError> {
    let record = s
        .store
        .revoke(&caller.tenant, id.as_str(), now_ms())
        .await?
        .ok_or_else(ApiError::key_not_found)?;
    s.verifier.cache.invalidate(&record.digest).await;
    tracing::info!(id = %record.id, tenant = %record.tenant, prefix = %record.prefix, "key revoked");
    Ok(record)
}

/// The outcome of a rotation: the successor (its text shown once) and when the old key
/// stops working.
pub struct Rotation {
    pub new: KeyRecord,
    pub key: NewKey,
    pub old_id: String,
    pub old_revokes_at: u64,
    /// The credits the new key has left (`None`: no credits), read just before the rotation.
    pub credits_remaining: Option<u64>,
}

/// A successor for key `id` now (same name, type, environment, scopes, lifetime, rate
/// limits and credits); the old key is refused `grace_ms` from now. The new key spends
/// the old key's budget (the first key of the chain's id), so during the grace period
/// both keys count against one set of limits and one balance of credits.
pub async fn rotate(
    s: &AdminState,
    caller: &Caller,
    id: &KeyId,
    grace_ms: u64,
) -> Result<Rotation, ApiError> {
    let old = get(s, caller, id).await?;
    // The caller receives the new key's text: it must hold every scope it carries.
    if !caller.may_grant(&old.scopes) {
        return Err(escalation());
    }
    let now = now_ms();
    // Fast paths only (no key generated for a refusal): the store decides both again
    // atomically, which is what keeps concurrent rotations from forking the key.
    if old.is_revoked_at(now) || old.is_expired_at(now) {
        return Err(StoreError::NotRotatable.into());
    }
    if old.successor_id.is_some() {
        return Err(StoreError::AlreadyRotated.into());
    }
    // The credits left, read before anything is written: a limit store failure after
    // the rotation would answer 503 and lose the new key's text. Old and new key share
    // the counter, so this is the new key's balance too.
    let credits_remaining = super::limits::credits_remaining(s, &old).await?;
    let spec = NewKeySpec {
        name: old.name.clone(),
        key_type: old.key_type,
        environment: old.environment,
        scopes: old.scopes.clone(),
        // Same lifetime as the old key had, counted from now.
        expires_at: old
            .expires_at
            .map(|e| now + e.saturating_sub(old.created_at)),
        limits: KeyLimits {
            ratelimits: old.limits.ratelimits.clone(),
            credits: old.limits.credits.clone(),
            budget: Some(old.limits.budget.clone().unwrap_or_else(|| old.id.clone())),
        },
    };
    let (mut new, key) = mint(s, &old.tenant, spec, now)?;
    let revokes_at = now + grace_ms;
    let updated_old = s
        .store
        .rotate(&caller.tenant, &old.id, &new, revokes_at, now)
        .await?
        .ok_or_else(ApiError::key_not_found)?;
    let mut credits_remaining = credits_remaining;
    if updated_old.limits.ratelimits != new.limits.ratelimits
        || updated_old.limits.credits != new.limits.credits
    {
        // A PATCH of the old key landed between its read and the rotation: the new key
        // takes the limits and credits now in force (one budget, one counter), before
        // anyone holds its text.
        let limits = KeyUpdate {
            ratelimits: Some(updated_old.limits.ratelimits.clone()),
            credits: Some(updated_old.limits.credits.clone()),
            ..KeyUpdate::default()
        };
        new = (s.store.update(&new.tenant, &new.id, &limits, now).await?)
            .ok_or_else(ApiError::key_not_found)?;
        credits_remaining = super::limits::credits_remaining(s, &new).await?;
    }
    s.verifier.cache.invalidate(&updated_old.digest).await;
    s.verifier.cache.invalidate(&new.digest).await;
    tracing::info!(old = %old.id, new = %new.id, tenant = %new.tenant, prefix = %new.prefix, "key rotated");
    Ok(Rotation {
        new,
        key,
        old_id: old.id,
        old_revokes_at: updated_old.revoked_at.unwrap_or(revokes_at),
        credits_remaining,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(r: Result<u64, ApiError>) -> String {
        let e = r.expect_err("refused");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "invalid_field")
        );
        e.message
    }

    /// Each document's wording of a bad duration, pinned.
    #[test]
    fn duration_fields_keep_their_ranges_and_messages() {
        assert_eq!(EXPIRES_IN.parse("90d").ok(), Some(90 * DAY_MS));
        assert_eq!(EXPIRES_IN.parse("1y").ok(), Some(31_557_600_000));
        for bad in [
            "0s", "soon", "36601d", " 90d ", "1h 30m", "1.5h", "2 hours", "01h",
        ] {
            let want = format!(
                "field `expires_in`: invalid duration {bad:?}; use a whole number and one unit \
                 of s, m, h, d, w, y, e.g. 12h, 90d, 1y"
            );
            assert_eq!(message(EXPIRES_IN.parse(bad)), want);
        }
        let grace = GRACE_PERIOD;
        assert_eq!(grace.parse("0s").ok(), Some(0));
        assert_eq!(grace.parse("366d").ok(), Some(366 * DAY_MS));
        let at_most = "field `grace_period`: at most 366d";
        assert_eq!(message(grace.parse("367d")), at_most);
        // Beyond u64 milliseconds is still just too long.
        assert_eq!(message(grace.parse("1000000000y")), at_most);
        assert_eq!(message(grace.parse("99999999999999999999999s")), at_most);
        let invalid = "field `grace_period`: invalid duration \"1 fortnight\"; use a whole \
                       number and one unit of s, m, h, d, w, y, e.g. 0s, 1h, 24h";
        assert_eq!(message(grace.parse("1 fortnight")), invalid);
    }

    #[test]
    fn limit_durations_keep_their_ranges_and_messages() {
        let d = RATELIMIT_DURATION;
        assert_eq!(d.parse("1s").ok(), Some(1_000));
        assert_eq!(d.parse("366d").ok(), Some(366 * DAY_MS));
        assert_eq!(
            message(d.parse_at("ratelimits[2].duration", "0s")),
            "field `ratelimits[2].duration`: at least 1s"
        );
        assert_eq!(message(d.parse("367d")), "field `duration`: at most 366d");
        let r = REFILL_INTERVAL;
        assert_eq!(r.parse("1m").ok(), Some(MINUTE_MS));
        assert_eq!(r.parse("60s").ok(), Some(MINUTE_MS));
        assert_eq!(message(r.parse("59s")), "field `interval`: at least 1m");
        assert_eq!(message(r.parse("0m")), "field `interval`: at least 1m");
        assert_eq!(r.parse("1y").ok(), Some(31_557_600_000));
        assert_eq!(message(r.parse("53w")), "field `interval`: at most 366d");
        let invalid = "field `credits.refill.interval`: invalid duration \"1.5h\"; use a whole \
                       number and one unit of s, m, h, d, w, y, e.g. 1h, 1d, 30d";
        assert_eq!(
            message(r.parse_at("credits.refill.interval", "1.5h")),
            invalid
        );
    }

    /// What the API shows is the shortest text in one unit, and reads back as the same.
    #[test]
    fn durations_are_shown_in_their_largest_exact_unit() {
        for (ms, text) in [
            (1_000, "1s"),
            (1_500, "1500ms"),
            (90_000, "90s"),
            (60_000, "1m"),
            (3_600_000, "1h"),
            (DAY_MS, "1d"),
            (7 * DAY_MS, "1w"),
            (8 * DAY_MS, "8d"),
            (366 * DAY_MS, "366d"),
            (31_557_600_000, "1y"),
            (0, "0s"),
        ] {
            assert_eq!(duration_text(ms), text);
            let back = crate::time::parse_duration(text).unwrap().as_millis();
            assert_eq!(back, u128::from(ms), "{text}");
        }
        // Every whole-second duration a client can set comes back in a form it may send.
        for s in (1..=200_000).chain((1..=366).map(|d| d * 86_400)) {
            let text = duration_text(s * 1_000);
            assert_eq!(
                RATELIMIT_DURATION.parse(&text).ok(),
                Some(s * 1_000),
                "{text}"
            );
        }
    }

    /// The duration fields of the OpenAPI document: (schema, property, parser).
    const DOCUMENTED_DURATIONS: [(&str, &str, &DurationField); 5] = [
        ("JackCreateRequest", "expires_in", &EXPIRES_IN),
        ("ApiKeyCreateRequest", "expires_in", &EXPIRES_IN),
        ("ApiKeyRotateRequest", "grace_period", &GRACE_PERIOD),
        ("RateLimitRequest", "duration", &RATELIMIT_DURATION),
        ("RefillRequest", "interval", &REFILL_INTERVAL),
    ];

    fn documented(schema: &str, property: &str) -> serde_json::Value {
        let doc: serde_json::Value =
            serde_json::from_str(crate::admin::router::OPENAPI).expect("valid JSON");
        doc["components"]["schemas"][schema]["properties"][property].clone()
    }

    /// `1..=max` in decimal without leading zeros, as a regular expression: shorter
    /// numbers, then, digit by digit, those of max's length below it.
    fn one_to(max: u64) -> String {
        let text = max.to_string();
        let digits: Vec<u8> = text.bytes().map(|b| b - b'0').collect();
        let len = digits.len();
        let any = |n: usize| match n {
            0 => String::new(),
            1 => "[0-9]".to_string(),
            n => format!("[0-9]{{{n}}}"),
        };
        let class = |lo: u8, hi: u8| match hi - lo {
            0 => lo.to_string(),
            _ => format!("[{lo}-{hi}]"),
        };
        let mut alternatives = match len {
            1 => vec![],
            2 => vec!["[1-9]".to_string()],
            3 => vec!["[1-9][0-9]?".to_string()],
            n => vec![format!("[1-9][0-9]{{0,{}}}", n - 2)],
        };
        for (i, &d) in digits.iter().enumerate() {
            let lo = u8::from(i == 0);
            if i + 1 == len {
                alternatives.push(format!("{}{}", &text[..i], class(lo, d)));
            } else if d > lo {
                alternatives.push(format!(
                    "{}{}{}",
                    &text[..i],
                    class(lo, d - 1),
                    any(len - i - 1)
                ));
            }
        }
        alternatives.join("|")
    }

    /// `lo..=hi` (`lo` at least 1) in decimal without leading zeros, as alternatives: for
    /// each length, digit by digit, as `one_to` does for 1.
    fn between(lo: u64, hi: u64) -> String {
        /// The numbers of `a..=b`, both of one length.
        fn same_length(a: &[u8], b: &[u8]) -> Vec<String> {
            let n = a.len();
            let text = |d: &[u8]| String::from_utf8(d.to_vec()).unwrap();
            if a == b {
                return vec![text(a)];
            }
            if a[0] == b[0] {
                let rest = same_length(&a[1..], &b[1..]);
                return rest
                    .into_iter()
                    .map(|r| format!("{}{r}", a[0] as char))
                    .collect();
            }
            let any = |n: usize| match n {
                0 => String::new(),
                1 => "[0-9]".to_string(),
                n => format!("[0-9]{{{n}}}"),
            };
            let class = |lo: u8, hi: u8| match hi - lo {
                0 => (lo as char).to_string(),
                _ => format!("[{}-{}]", lo as char, hi as char),
            };
            let (lo_rest_zero, hi_rest_nine) = (
                a[1..].iter().all(|&d| d == b'0'),
                b[1..].iter().all(|&d| d == b'9'),
            );
            let mut out = Vec::new();
            let mut first = a[0];
            if !lo_rest_zero {
                let nines = vec![b'9'; n - 1];
                let low = same_length(&a[1..], &nines);
                out.extend(low.into_iter().map(|r| format!("{}{r}", a[0] as char)));
                first += 1;
            }
            let last = if hi_rest_nine { b[0] } else { b[0] - 1 };
            if first <= last {
                out.push(format!("{}{}", class(first, last), any(n - 1)));
            }
            if !hi_rest_nine {
                let zeros = vec![b'0'; n - 1];
                let high = same_length(&zeros, &b[1..]);
                out.extend(high.into_iter().map(|r| format!("{}{r}", b[0] as char)));
            }
            out
        }
        assert!((1..=hi).contains(&lo));
        let mut out = Vec::new();
        let mut from = lo;
        while from <= hi {
            let len = from.to_string().len() as u32;
            let to = hi.min(10u64.saturating_pow(len).saturating_sub(1));
            out.extend(same_length(
                from.to_string().as_bytes(),
                to.to_string().as_bytes(),
            ));
            from = to + 1;
        }
        out.join("|")
    }

    #[test]
    fn number_ranges_from_above_one_as_regexes() {
        assert_eq!(between(60, 99), "[6-9][0-9]");
        assert_eq!(between(65, 123), "6[5-9]|[7-9][0-9]|1[0-1][0-9]|12[0-3]");
        for (lo, hi) in [
            (2, 9),
            (5, 5),
            (10, 99),
            (11, 98),
            (60, 31_622_400),
            (123, 456),
            (199, 2_001),
            (999, 1_000),
            (1_000, 9_999),
            (4_321, 98_765),
        ] {
            let re = regex::Regex::new(&format!("^({})$", between(lo, hi))).unwrap();
            let mut numbers: Vec<u64> = (0..=3_000).collect();
            numbers.extend(lo.saturating_sub(1_000)..=lo + 1_000);
            numbers.extend(hi.saturating_sub(1_000)..=hi + 1_000);
            for p in (1..=9).map(|k| 10u64.pow(k)) {
                numbers.extend([p - 1, p, p + 1, hi / p * p, lo / p * p + p - 1]);
            }
            for n in numbers {
                assert_eq!(
                    re.is_match(&n.to_string()),
                    (lo..=hi).contains(&n),
                    "{lo}..={hi}: {n}"
                );
                assert!(!re.is_match(&format!("0{n}")), "{lo}..={hi}: 0{n}");
            }
        }
    }

    fn unit_ms(unit: &str) -> u64 {
        let one = crate::time::parse_duration(&format!("1{unit}")).expect("a unit");
        u64::try_from(one.as_millis()).unwrap()
    }

    /// The pattern that accepts exactly what `f.parse` accepts: per unit, the whole
    /// numbers whose length in milliseconds is in range.
    fn pattern(f: &DurationField) -> String {
        let units: Vec<String> = DURATION_UNITS
            .iter()
            .filter_map(|&unit| {
                let ms = unit_ms(unit);
                let (lo, hi) = (f.range_ms.start().div_ceil(ms), f.range_ms.end() / ms);
                if lo > hi {
                    return None;
                }
                let numbers = match (lo, hi) {
                    (0, 0) => "0".to_string(),
                    (0, hi) => format!("0|{}", one_to(hi)),
                    (1, hi) => one_to(hi),
                    (lo, hi) => between(lo, hi),
                };
                Some(format!("({numbers}){unit}"))
            })
            .collect();
        format!("^({})$", units.join("|"))
    }

    /// The pattern without `^` and `$`, for proptest to generate from.
    fn unanchored(f: &DurationField) -> &'static str {
        let p = pattern(f);
        p[1..p.len() - 1].to_string().leak()
    }

    #[test]
    fn number_ranges_as_regexes() {
        assert_eq!(one_to(1), "1");
        assert_eq!(one_to(9), "[1-9]");
        assert_eq!(one_to(52), "[1-9]|[1-4][0-9]|5[0-2]");
        assert_eq!(one_to(366), "[1-9][0-9]?|[1-2][0-9]{2}|3[0-5][0-9]|36[0-6]");
        assert_eq!(
            one_to(36600),
            "[1-9][0-9]{0,3}|[1-2][0-9]{4}|3[0-5][0-9]{3}|36[0-5][0-9]{2}|36600"
        );
        for max in [
            1, 7, 9, 10, 19, 20, 52, 100, 101, 366, 999, 1000, 5228, 36600, 527040, 3162240000,
        ] {
            let re = regex::Regex::new(&format!("^({})$", one_to(max))).unwrap();
            // Every small number, every number near max and near 10 max, and the edges of
            // every power of ten and of every digit of max.
            let mut numbers: Vec<u64> = (0..=2_000).collect();
            numbers.extend(max.saturating_sub(2_000)..=max + 2_000);
            numbers.extend(max * 10 - 10..=max * 10 + 10);
            for p in (1..=19).map(|k| 10u64.pow(k)) {
                numbers.extend([
                    p - 1,
                    p,
                    p + 1,
                    max / p * p,
                    max / p * p + p - 1,
                    max / p * p + p,
                ]);
            }
            for n in numbers {
                assert_eq!(
                    re.is_match(&n.to_string()),
                    (1..=max).contains(&n),
                    "{max}: {n}"
                );
                assert!(!re.is_match(&format!("0{n}")), "{max}: 0{n}");
            }
        }
    }

    /// Each duration field of the OpenAPI document has the pattern that matches exactly
    /// the strings its parser accepts, so that a schema-valid request is never refused
    /// for it (schemathesis' positive_data_acceptance) and a schema-invalid one never
    /// accepted (negative_data_rejection); its examples parse.
    #[test]
    fn openapi_duration_patterns_match_exactly_what_parses() {
        for (schema, property, f) in DOCUMENTED_DURATIONS {
            let doc = documented(schema, property);
            let wanted = pattern(f);
            assert_eq!(
                doc["pattern"].as_str(),
                Some(wanted.as_str()),
                "{schema}.{property} in openapi.json: set its pattern to {wanted:?}"
            );
            let re = regex::Regex::new(&wanted).unwrap();
            let examples = doc["examples"].as_array().expect("examples");
            assert!(!examples.is_empty());
            for e in examples {
                let e = e.as_str().unwrap();
                assert!(re.is_match(e) && f.parse(e).is_ok(), "example {e:?}");
            }
            let mut cases: Vec<String> = [
                "",
                "0",
                "s",
                "1",
                "h1",
                "1 h",
                " 1h",
                "1h ",
                "1h\n",
                "01h",
                "00s",
                "1h30m",
                "1h 30m",
                "1.5h",
                "1H",
                "1hour",
                "2 hours",
                "1ms",
                "1M",
                "+1h",
                "-1h",
                "1e3s",
                "\u{ff11}h",
                "1\u{b5}s",
                "0x10s",
                "1ss",
                "1hs",
            ]
            .map(String::from)
            .into();
            for unit in DURATION_UNITS {
                let ms = unit_ms(unit);
                let (lo, hi) = (f.range_ms.start() / ms, f.range_ms.end() / ms);
                for n in [
                    0,
                    1,
                    2,
                    9,
                    10,
                    11,
                    99,
                    100,
                    101,
                    lo,
                    hi - 1,
                    hi,
                    hi + 1,
                    hi * 10,
                ] {
                    cases.push(format!("{n}{unit}"));
                    cases.push(format!("0{n}{unit}"));
                }
                cases.push(format!("{}{unit}", u64::MAX / ms + 1));
                cases.push(format!("{}{unit}", u64::MAX));
                cases.push(format!("{}0{unit}", u64::MAX));
            }
            for c in &cases {
                assert_eq!(re.is_match(c), f.parse(c).is_ok(), "{property}: {c:?}");
            }
        }
    }

    /// `unused_for` is documented once (a shared parameter of both list operations) with
    /// the pattern of exactly what `unused_cutoff` accepts; anything else is `invalid_query`.
    #[test]
    fn openapi_unused_for_matches_what_parses() {
        let doc: serde_json::Value =
            serde_json::from_str(crate::admin::router::OPENAPI).expect("valid JSON");
        let param = &doc["components"]["parameters"]["UnusedFor"];
        let wanted = pattern(&UNUSED_FOR);
        assert_eq!(param["schema"]["pattern"].as_str(), Some(wanted.as_str()));
        for path in ["/v1/keys", "/v1/api-keys"] {
            let params = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
            let refs = params
                .iter()
                .filter(|p| p["$ref"] == "#/components/parameters/UnusedFor");
            assert_eq!(refs.count(), 1, "{path}");
        }
        let re = regex::Regex::new(&wanted).unwrap();
        for text in [
            "90d", "1s", "36600d", "100y", "0s", "36601d", "1h 30m", "1.5h", "", "90",
        ] {
            let got = unused_cutoff(Some(text), 10 * DAY_MS);
            assert_eq!(re.is_match(text), got.is_ok(), "{text:?}");
            if let Err(e) = got {
                assert_eq!(e.code, "invalid_query");
                assert!(
                    e.message.starts_with("parameter `unused_for`"),
                    "{}",
                    e.message
                );
            }
        }
        assert_eq!(
            unused_cutoff(Some("1d"), 10 * DAY_MS).unwrap(),
            Some(9 * DAY_MS)
        );
        assert_eq!(unused_cutoff(Some("1y"), DAY_MS).unwrap(), Some(0));
        assert_eq!(unused_cutoff(None, DAY_MS).unwrap(), None);
    }

    proptest::proptest! {
        /// Strings drawn from each pattern all parse (schemathesis draws the same way).
        #[test]
        fn what_the_patterns_generate_parses(
            expires_in in proptest::string::string_regex(unanchored(&EXPIRES_IN)).unwrap(),
            grace in proptest::string::string_regex(unanchored(&GRACE_PERIOD)).unwrap(),
            duration in proptest::string::string_regex(unanchored(&RATELIMIT_DURATION)).unwrap(),
            interval in proptest::string::string_regex(unanchored(&REFILL_INTERVAL)).unwrap(),
        ) {
            proptest::prop_assert!(EXPIRES_IN.parse(&expires_in).is_ok(), "{expires_in:?}");
            proptest::prop_assert!(GRACE_PERIOD.parse(&grace).is_ok(), "{grace:?}");
            proptest::prop_assert!(RATELIMIT_DURATION.parse(&duration).is_ok(), "{duration:?}");
            proptest::prop_assert!(REFILL_INTERVAL.parse(&interval).is_ok(), "{interval:?}");
        }

        /// And any duration-like text is accepted exactly when the pattern matches it.
        #[test]
        fn parse_and_pattern_agree(text in "[0-9]{0,12}[smhdwyM .0-9]{0,3}") {
            for f in [&EXPIRES_IN, &GRACE_PERIOD, &RATELIMIT_DURATION, &REFILL_INTERVAL] {
                let re = regex::Regex::new(&pattern(f)).unwrap();
                proptest::prop_assert_eq!(re.is_match(&text), f.parse(&text).is_ok(), "{:?}", text);
            }
        }
    }

    #[test]
    fn page_requests_take_a_limit_of_1_to_1000() {
        let p = page_request(None, Some("c".into()), 100).expect("the default");
        assert_eq!((p.limit, p.cursor.as_deref()), (100, Some("c")));
        assert_eq!(
            page_request(Some("1000"), None, 100).map(|p| p.limit).ok(),
            Some(1000)
        );
        for bad in ["0", "1001", "-1", "ten", ""] {
            let e = page_request(Some(bad), None, 100).expect_err(bad);
            assert_eq!(e.code, "invalid_query");
            assert_eq!(e.message, "parameter `limit`: use 1 to 1000");
        }
    }
}
