//! The one decision, for the proxy port, `POST /v1/explain` and the admin API's own
//! keys alike. `Verifier::decide` takes a request (method, path, key) through the method
//! check, path normalisation and the route table, then `verify` the key: take the token
//! from `Authorization`, check its format (no I/O), look its digest up in the cache, then
//! apply the record's rules. Imported keys of a configured legacy format (`keys.legacy`)
//! take the same path, by their digest. Side effects (metrics, last-used, rate limits)
//! are the caller's: these only decide.

use crate::cache::{Entry, Identity, KeyCache, Reader, Source, Ttls};
use crate::error::{Challenge, Deny};
use crate::key::{self, KeyHasher, KeyType, LegacyFormats, Prefixes, TokenKind};
use crate::policy::path::{normalize_request, Normalized, PathError};
use crate::policy::{Policy, Route};
use crate::store::StoreError;
use http::header::AUTHORIZATION;
use http::Method;
use std::sync::Arc;
use std::time::Instant;

/// What a caller must hold: a route's scopes, or a management call's one scope.
pub struct Need<'a, S: AsRef<str>> {
    pub scopes: &'a [S],
    pub allow_publishable: bool,
    /// `WWW-Authenticate` for a key lacking `scopes` (the proxy's answer).
    pub challenge: &'a Challenge,
}

/// The decision on one token, with what the caller needs for its side effects.
pub struct Verdict {
    pub result: Result<(), Deny>,
    /// The key's record once found, also when refused (the access log names it).
    pub identity: Option<Arc<Identity>>,
    /// Where the record came from; `None` when the store could not be read or the
    /// token was refused before a lookup.
    pub source: Option<Source>,
    /// Why the store could not be read (the caller logs and counts it).
    pub store_error: Option<Arc<StoreError>>,
    /// The wall-clock time the record was judged at (Unix ms; 0 before a lookup).
    pub at_ms: u64,
}

impl Verdict {
    fn refused(deny: Deny) -> Verdict {
        Verdict {
            result: Err(deny),
            identity: None,
            source: None,
            store_error: None,
            at_ms: 0,
        }
    }

    /// The identity of an allowed key.
    pub fn allowed(&self) -> Option<&Arc<Identity>> {
        self.result.as_ref().ok().and(self.identity.as_ref())
    }
}

/// The reloadable rules a check follows, from the request's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub ttls: Ttls,
    /// `cache.on_store_error: deny`: refuse cached keys while the store is failing.
    pub deny_on_store_error: bool,
}

/// Everything a key check needs besides the request: the cache (and the store behind
/// it), the digest function and the accepted key formats.
#[derive(Clone)]
pub struct Verifier {
    pub cache: Arc<KeyCache>,
    pub hasher: KeyHasher,
    pub prefixes: Prefixes,
    /// Formats of imported keys accepted besides keygate's own (`keys.legacy`).
    pub legacy: LegacyFormats,
}

/// Which digest of a token a record was found under.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Candidate {
    /// `KeyHasher::digest` (peppered when a pepper is configured).
    Hasher,
    /// Plain SHA-256 of a legacy-format token, tried second when a pepper is configured.
    PlainSha256,
}

impl Verifier {
    /// Format, digest, cache (reading `reader` on a miss), record. `started` is the time
    /// the caller already read.
    ///
    /// A legacy-format token is looked up by its peppered digest and, with a pepper, then
    /// by plain SHA-256 (where keys imported by hash are); the record must say which
    /// kind of digest it has, so a keygate key never matches an unpeppered one.
    pub async fn verify<S: AsRef<str>>(
        &self,
        token: &str,
        need: &Need<'_, S>,
        rules: Rules,
        reader: &Reader,
        started: Instant,
    ) -> Verdict {
        let Ok(kind) = key::classify(&self.prefixes, &self.legacy, token) else {
            return Verdict::refused(Deny::MalformedKey);
        };
        let mut digest = self.hasher.digest(token);
        let (mut entry, mut source) = match self.lookup(&digest, started, rules, reader).await {
            Ok(found) => found,
            Err(refused) => return refused,
        };
        let mut candidate = Candidate::Hasher;
        if kind == TokenKind::Legacy && self.hasher.is_peppered() && matches!(entry, Entry::Unknown)
        {
            let first = (digest, source);
            digest = key::sha256(token.as_bytes());
            candidate = Candidate::PlainSha256;
            let (e, s) = match self.lookup(&digest, started, rules, reader).await {
                Ok(found) => found,
                Err(refused) => return refused,
            };
            if first.1 == Source::Store && matches!(e, Entry::Known(_)) {
                // The peppered miss was just read: hold it as long as the record found
                // instead, so the key's requests do not re-read it every negative TTL.
                self.cache.hold_unknown(&first.0, rules.ttls).await;
            }
            (entry, source) = (e, if first.1 == Source::Store { first.1 } else { s });
        }
        let fits = |id: &Identity| self.digest_kind_fits(id, kind, candidate);
        self.judge(entry, source, &digest, need, rules, fits)
    }

    /// `verify` from the digest on: a stored key named by its id (`POST /v1/explain`)
    /// has no text to check, and is the record named whatever its digest's kind.
    pub async fn verify_digest<S: AsRef<str>>(
        &self,
        digest: &key::Digest,
        need: &Need<'_, S>,
        rules: Rules,
        reader: &Reader,
        started: Instant,
    ) -> Verdict {
        match self.lookup(digest, started, rules, reader).await {
            Ok((entry, source)) => self.judge(entry, source, digest, need, rules, |_| true),
            Err(refused) => refused,
        }
    }

    /// The verdict on what the lookup found; `fits` says whether a record may answer.
    fn judge<S: AsRef<str>>(
        &self,
        entry: Entry,
        source: Source,
        digest: &key::Digest,
        need: &Need<'_, S>,
        rules: Rules,
        fits: impl Fn(&Identity) -> bool,
    ) -> Verdict {
        if rules.deny_on_store_error && source == Source::Cache && !self.cache.store_ok() {
            // Refused as if the read had not happened: no source, nothing to time.
            return Verdict::refused(Deny::StoreUnavailable);
        }
        let mut verdict = Verdict::refused(Deny::UnknownKey);
        verdict.source = Some(source);
        if let Entry::Known(id) = entry {
            if !fits(&id) {
                return verdict;
            }
            verdict.at_ms = crate::time::now_ms();
            verdict.result = check_record(&id, digest, need, verdict.at_ms);
            verdict.identity = Some(id);
        }
        verdict
    }

    /// One cache lookup; a store failure is the verdict.
    async fn lookup(
        &self,
        digest: &key::Digest,
        started: Instant,
        rules: Rules,
        reader: &Reader,
    ) -> Result<(Entry, Source), Verdict> {
        self.cache
            .lookup_at(digest, started, rules.ttls, reader)
            .await
            .map_err(|e| {
                let mut v = Verdict::refused(Deny::StoreUnavailable);
                v.store_error = Some(e);
                v
            })
    }

    /// May a record with this kind of digest answer this token? A keygate key only
    /// matches keygate-made digests; a legacy token's peppered digest likewise (without a
    /// pepper both kinds are plain SHA-256, so either); its plain SHA-256 only a record
    /// imported by hash.
    fn digest_kind_fits(&self, id: &Identity, kind: TokenKind, candidate: Candidate) -> bool {
        match (kind, candidate) {
            (TokenKind::Keygate, _) => !id.plain_sha256,
            (TokenKind::Legacy, Candidate::Hasher) => {
                !id.plain_sha256 || !self.hasher.is_peppered()
            }
            (TokenKind::Legacy, Candidate::PlainSha256) => id.plain_sha256,
        }
    }
}

/// The key a decision checks: the request's `Authorization` (the proxy), or one given
/// directly (`POST /v1/explain`: a key's text, or a stored key's digest found by its id).
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    Headers(&'a http::HeaderMap),
    Token(&'a str),
    Digest(&'a key::Digest),
}

/// One request as the decision sees it.
pub struct Ask<'a> {
    pub method: &'a Method,
    /// The request's path, as sent (no query).
    pub path: &'a str,
    pub credential: Credential<'a>,
    /// What the proxy's transport refused after the method's check and before the
    /// path's (the Host rules); `None` for `explain`, which has no transport.
    pub transport: Option<Deny>,
}

/// A key check and when it started (the proxy times it from there).
pub struct KeyCheck {
    pub verdict: Verdict,
    pub started: Instant,
}

/// Everything `decide` found, step by step: each field is set once its step ran.
pub struct Decision<'p, 'r> {
    /// The path as normalised, or why it was refused; `None` when refused before.
    pub path: Option<Result<Normalized<'r>, PathError>>,
    /// The route matched (its index; `None` for the `unmatched` pseudo-route).
    pub route: Option<(Option<usize>, &'p Route)>,
    /// The key check, on a route that needs a key once a token was found.
    pub key: Option<KeyCheck>,
    /// A refusal made before any key check (method, Host, path, route, `Authorization`).
    pub refused: Option<Deny>,
}

/// A request the decision lets through: where it goes, and who sends it.
pub struct Admitted<'p, 'r> {
    pub index: Option<usize>,
    pub route: &'p Route,
    pub path: Normalized<'r>,
    /// `None` on a public route.
    pub identity: Option<Arc<Identity>>,
    /// When the key was judged (Unix ms, `Verdict::at_ms`; 0 without a key): the rate
    /// limiter decides at the same instant rather than read the clock again.
    pub judged_at: u64,
}

/// What the proxy does with a request: forward it, or answer the refusal.
pub enum Outcome<'p, 'r> {
    Admitted(Admitted<'p, 'r>),
    Refused(Refused),
}

/// A request the decision refuses, with its route and key as far as they were found.
pub struct Refused {
    pub index: Option<usize>,
    pub deny: Deny,
    pub identity: Option<Arc<Identity>>,
}

impl Decision<'_, '_> {
    fn refused(deny: Deny) -> Self {
        Decision {
            path: None,
            route: None,
            key: None,
            refused: Some(deny),
        }
    }

    /// Allowed, or the refusal (`Deny::status` and `Deny::code` give its answer).
    pub fn result(&self) -> Result<(), &Deny> {
        match (&self.refused, &self.key) {
            (Some(d), _) => Err(d),
            (None, Some(k)) => match (&k.verdict.result, &k.verdict.identity) {
                (Err(d), _) => Err(d),
                (Ok(()), Some(_)) => Ok(()),
                // `verify` allows only a key it found; refuse rather than trust an empty answer.
                (Ok(()), None) => Err(&Deny::UnknownKey),
            },
            (None, None) => Ok(()),
        }
    }
}

impl<'p, 'r> Decision<'p, 'r> {
    /// The proxy's view: forward, or answer the refusal.
    pub fn into_outcome(self) -> Outcome<'p, 'r> {
        let index = self.route.and_then(|(i, _)| i);
        let (result, identity, judged_at) = match self.key {
            Some(KeyCheck { verdict, .. }) => match (verdict.result, verdict.identity) {
                (Ok(()), None) => (Err(Deny::UnknownKey), None, 0),
                (r, id) => (r, id, verdict.at_ms),
            },
            None => (Ok(()), None, 0),
        };
        let deny = self.refused.or(result.err());
        match (deny, self.route, self.path) {
            (None, Some((index, route)), Some(Ok(path))) => Outcome::Admitted(Admitted {
                index,
                route,
                path,
                identity,
                judged_at,
            }),
            (deny, ..) => Outcome::Refused(Refused {
                index,
                // Every step that sets no route or path refuses: never the fallback.
                deny: deny.unwrap_or(Deny::NoRoute),
                identity,
            }),
        }
    }
}

/// The method's rule: a method with lower-case letters is refused, since WSGI and Rack
/// upper-case it and `delete` would be matched as one method and run as another.
fn check_method(method: &Method) -> Result<(), Deny> {
    if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(Deny::BadMethod);
    }
    Ok(())
}

/// The decision's first steps, without a key (also `keygate explain`, offline): the
/// method, the transport's refusal, the path normalised, then the route table.
pub fn route<'p, 'r>(policy: &'p Policy, ask: &Ask<'r>) -> Decision<'p, 'r> {
    if let Err(d) = check_method(ask.method) {
        return Decision::refused(d);
    }
    if let Some(d) = &ask.transport {
        return Decision::refused(d.clone());
    }
    let path = match normalize_request(ask.path) {
        Ok(p) => p,
        Err(e) => {
            let mut d = Decision::refused(Deny::BadPath);
            d.path = Some(Err(e));
            return d;
        }
    };
    // Forwarded as it is, params kept: refused unless its route does not depend on them.
    let found = policy.find_unambiguous(ask.method, &path.path, path.has_params);
    let mut d = Decision::refused(Deny::NoRoute);
    d.path = Some(Ok(path));
    match found {
        Err(_) => d.refused = Some(Deny::BadPath),
        Ok(None) => {}
        Ok(Some(found)) => {
            d.route = Some(found);
            d.refused = None;
        }
    }
    d
}

impl Verifier {
    /// The whole decision on one request: `route`, then, on a route that needs a key,
    /// the key (`verify`). No side effects (metrics, last-used and rate limits are the
    /// caller's); a cache miss fills the cache as any lookup does.
    pub async fn decide<'p, 'r>(
        &self,
        policy: &'p Policy,
        ask: Ask<'r>,
        rules: Rules,
        reader: &Reader,
    ) -> Decision<'p, 'r> {
        let mut d = route(policy, &ask);
        let route = match d.route {
            Some((_, r)) if d.refused.is_none() && !r.public => r,
            _ => return d,
        };
        let need = Need {
            scopes: &route.scopes,
            allow_publishable: route.allow_publishable,
            challenge: &route.scope_challenge,
        };
        let token = match ask.credential {
            Credential::Headers(h) => match bearer(h) {
                Ok(t) => Some(t),
                Err(deny) => {
                    d.refused = Some(deny);
                    return d;
                }
            },
            Credential::Token(t) => Some(t),
            Credential::Digest(_) => None,
        };
        let started = Instant::now();
        let verdict = match (token, ask.credential) {
            (Some(t), _) => self.verify(t, &need, rules, reader, started).await,
            (None, Credential::Digest(digest)) => {
                self.verify_digest(digest, &need, rules, reader, started)
                    .await
            }
            (None, _) => Verdict::refused(Deny::MissingKey),
        };
        d.key = Some(KeyCheck { verdict, started });
        d
    }
}

/// The record's own rules, in the order a caller would want to hear about them.
pub fn check_record<S: AsRef<str>>(
    id: &Identity,
    digest: &key::Digest,
    need: &Need<'_, S>,
    now_ms: u64,
) -> Result<(), Deny> {
    if !key::ct_eq(&id.digest, digest) {
        return Err(Deny::UnknownKey);
    }
    if id.is_revoked_at(now_ms) {
        return Err(Deny::RevokedKey);
    }
    if id.is_expired_at(now_ms) {
        return Err(Deny::ExpiredKey);
    }
    if id.key_type == KeyType::Publishable && !need.allow_publishable {
        return Err(Deny::PublishableNotAllowed);
    }
    if !id.grants_all(need.scopes) {
        return Err(Deny::InsufficientScope(need.challenge.clone()));
    }
    Ok(())
}

/// The token of the one `Authorization: Bearer` header. Keys in query strings are
/// never looked at.
pub fn bearer(headers: &http::HeaderMap) -> Result<&str, Deny> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let value = all.next().ok_or(Deny::MissingKey)?;
    if all.next().is_some() {
        return Err(Deny::MultipleAuthorization);
    }
    let value = value.to_str().map_err(|_| Deny::MalformedKey)?.trim();
    let (scheme, token) = match value.split_once(' ') {
        Some(parts) => parts,
        None if value.eq_ignore_ascii_case("bearer") => return Err(Deny::MalformedKey),
        None => return Err(Deny::UnsupportedScheme),
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Deny::UnsupportedScheme);
    }
    Ok(token.trim_start())
}

/// Property tests: `bearer` sees the client's `Authorization` headers, whatever they hold.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Header value bytes around the schemes and separators that matter, plus any byte.
    fn value() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            4 => prop::sample::select(vec![
                "Bearer", "bearer", "BEARER", "Basic", "Bearer ", " ", " ", "\t", "sk_live_",
                "abc", "=", ",", "\"", "é", "\u{0}",
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
            1 => any::<u8>().prop_map(|b| vec![b]),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        #[test]
        fn bearer_returns_a_trimmed_suffix_of_the_one_header(
            values in prop::collection::vec(value(), 0..3)
        ) {
            let mut headers = http::HeaderMap::new();
            for v in &values {
                // What the HTTP parser could hand over: a value `HeaderValue` accepts.
                if let Ok(v) = http::HeaderValue::from_bytes(v) {
                    headers.append(AUTHORIZATION, v);
                }
            }
            let Ok(token) = bearer(&headers) else { return Ok(()) };
            let all: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
            prop_assert_eq!(all.len(), 1);
            let value = all[0].to_str().map(str::trim);
            prop_assert!(value.is_ok());
            let value = value.unwrap_or_default();
            // The token is the value's own text after `Bearer `: never empty, never padded.
            prop_assert!(value.ends_with(token), "{:?} -> {:?}", value, token);
            prop_assert!(!token.is_empty() && token.trim() == token, "{:?} -> {:?}", value, token);
            let scheme = value[..value.len() - token.len()].trim_end();
            prop_assert!(scheme.eq_ignore_ascii_case("bearer"), "{:?} -> {:?}", value, token);
        }
    }
}
