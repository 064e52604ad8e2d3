//! Validation of the raw config, one function per YAML section, each refusing with the
//! field path as written in the file. Checks run in file order, so that of two mistakes
//! the same one is always reported.
#![allow(
    clippy::disallowed_methods,
    reason = "checked files are read at start and at reload, never per request"
)]

use super::locate::FieldPath;
use super::raw::{
    Auth, RawAdmin, RawCache, RawConfig, RawIdentityHeaders, RawKeys, RawLegacyFormat, RawLimits,
    RawPrefixes, RawProxy, RawRateLimits, RawRoute, RawRouteLimit, RawStore, RawTimeouts, RawTls,
    UnderscoreHeaders, Unmatched, DEFAULT_PEPPER_ENV,
};
use super::{
    CacheRules, Env, Fixed, Limits, Live, RateLimitRules, StoreConfig, Timeouts, Upstream,
};
use crate::header_names::{CLIENT_CLAIMS, OVERRIDES};
use crate::key::{LegacyFormat, LegacyFormats, Prefixes};
use crate::policy::{self, HeaderPolicy, IdentityHeaders, Policy, PolicySpec, RouteSpec};
use secrecy::SecretString;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A refusal: the field and why. `super` adds the file name and, for a field of the
/// file, its line.
pub(super) struct Invalid {
    pub field: Field,
    pub message: String,
}

/// What a refusal is about: a field of the file, or a value from outside it (an
/// environment variable), which has no line.
pub(super) enum Field {
    File(FieldPath),
    Outside(String),
}

impl From<&str> for Field {
    fn from(dotted: &str) -> Self {
        Field::File(FieldPath::keys(dotted))
    }
}

impl From<FieldPath> for Field {
    fn from(path: FieldPath) -> Self {
        Field::File(path)
    }
}

pub(super) type Result<T> = std::result::Result<T, Invalid>;

pub(super) fn invalid(field: impl Into<Field>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A refusal of a value that came from the environment: named, never located.
pub(super) fn outside(name: &str, message: impl Into<String>) -> Invalid {
    invalid(Field::Outside(name.into()), message)
}

/// `routes[i]` (`i` from 0; shown from 1).
fn route_field(i: usize, field: &str) -> FieldPath {
    FieldPath::keys("routes").index(i).key(field)
}

/// The whole file, section by section.
pub(super) fn validate(raw: RawConfig, env: &dyn Env) -> Result<(Fixed, Live)> {
    let RawConfig {
        proxy,
        admin,
        store,
        cache,
        keys,
        routes,
        unmatched,
        rate_limits,
        secret_scanning,
    } = raw;
    let (proxy_listen, admin_listen) = listen(&proxy, &admin, env)?;
    let upstream = upstream(&proxy, env)?;
    let (store, last_used_interval, dormant_interval) = self::store(store, env)?;
    let (cache, cache_max_entries) = self::cache(&cache)?;
    let limits = self::limits(&proxy.limits, &admin)?;
    let timeouts = self::timeouts(&proxy.timeouts)?;
    let (prefixes, pepper) = self::keys(keys.as_ref(), env)?;
    let legacy = self::legacy(keys.as_ref(), &prefixes)?;
    let root_token = self::root_token(&admin, env)?;
    let upstream_ca = self::upstream_ca(&proxy)?;
    let tls = tls_pair("proxy.tls", &proxy.tls)?;
    let admin_tls = tls_pair("admin.tls", &admin.tls)?;
    let policy = self::policy(&proxy, &routes, unmatched)?;
    let (limit_rules, limit_sync_interval) = self::rate_limits(&rate_limits)?;
    let secret_scanning = super::scanning::validate(secret_scanning, proxy_listen, admin_listen)?;
    let fixed = Fixed {
        proxy_listen,
        proxy_workers: proxy.workers.resolve(),
        admin_listen,
        upstream,
        upstream_ca,
        tls,
        admin_tls,
        timeouts,
        limits,
        root_token,
        default_tenant: admin.default_tenant.0,
        store,
        last_used_interval,
        dormant_interval,
        cache_max_entries,
        prefixes,
        pepper,
        legacy,
        limit_sync_interval,
        secret_scanning,
    };
    let live = Live {
        policy: Arc::new(policy),
        cache,
        rate_limits: limit_rules,
    };
    Ok((fixed, live))
}

/// `proxy.listen` and `admin.listen` (each overridable from the environment): two
/// different ports, or the admin API would answer on the proxy's.
fn listen(proxy: &RawProxy, admin: &RawAdmin, env: &dyn Env) -> Result<(SocketAddr, SocketAddr)> {
    let addr = |name: &str, default: SocketAddr| {
        env.var(name)
            .map(|v| v.parse().map_err(|e| outside(name, format!("{e}"))))
            .transpose()
            .map(|a| a.unwrap_or(default))
    };
    let proxy_listen = addr("KEYGATE_PROXY_LISTEN", proxy.listen)?;
    let admin_listen = addr("KEYGATE_ADMIN_LISTEN", admin.listen)?;
    if overlaps(proxy_listen, admin_listen) {
        let shared = "the admin API must not share the proxy's address";
        return Err(match env.var("KEYGATE_ADMIN_LISTEN") {
            Some(_) => outside("KEYGATE_ADMIN_LISTEN", shared),
            None => invalid("admin.listen", shared),
        });
    }
    Ok((proxy_listen, admin_listen))
}

/// Would two listeners take the same port (an unspecified address takes every one)?
/// Port 0 is a fresh port each time, so never.
pub(super) fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `proxy.upstream`, or `KEYGATE_UPSTREAM`.
fn upstream(proxy: &RawProxy, env: &dyn Env) -> Result<Upstream> {
    match env.var("KEYGATE_UPSTREAM") {
        Some(v) => Upstream::parse(&v).map_err(|m| outside("KEYGATE_UPSTREAM", m)),
        None => Ok(proxy.upstream.clone()),
    }
}

/// `store`: exactly one backend, `last_used_interval` and `dormant_interval`.
fn store(raw: RawStore, env: &dyn Env) -> Result<(StoreConfig, Duration, Duration)> {
    let store = match (raw.redis, raw.memory) {
        (Some(r), None) => StoreConfig::Redis(super::backend::redis(r, env)?),
        (None, Some(_)) => StoreConfig::Memory,
        _ => return Err(invalid("store", "set exactly one of `redis` or `memory`")),
    };
    if raw.last_used_interval.0 < Duration::from_millis(10) {
        return Err(invalid("store.last_used_interval", "must be at least 10ms"));
    }
    if raw.dormant_interval.0 < Duration::from_millis(10) {
        return Err(invalid("store.dormant_interval", "must be at least 10ms"));
    }
    Ok((store, raw.last_used_interval.0, raw.dormant_interval.0))
}

/// `cache`: the reloadable rules, and `max_entries` (fixed: it sizes the cache).
fn cache(raw: &RawCache) -> Result<(CacheRules, u64)> {
    if raw.ttl.0.is_zero() {
        return Err(invalid("cache.ttl", "must be above zero"));
    }
    if raw.negative_ttl.0 > raw.ttl.0 {
        return Err(invalid("cache.negative_ttl", "must not exceed cache.ttl"));
    }
    if raw.max_entries == 0 {
        return Err(invalid("cache.max_entries", "must be above zero"));
    }
    let rules = CacheRules {
        ttl: raw.ttl.0,
        negative_ttl: raw.negative_ttl.0,
        on_store_error: raw.on_store_error,
    };
    Ok((rules, raw.max_entries))
}

/// `proxy.limits` (`max_body_bytes` belongs to the policy) and `admin.max_connections`.
fn limits(l: &RawLimits, admin: &RawAdmin) -> Result<Limits> {
    if !(8192..=1 << 20).contains(&l.max_header_bytes) {
        return Err(invalid(
            "proxy.limits.max_header_bytes",
            "must be between 8192 and 1048576",
        ));
    }
    if !(64..=1 << 20).contains(&l.max_uri_bytes) {
        return Err(invalid(
            "proxy.limits.max_uri_bytes",
            "must be between 64 and 1048576",
        ));
    }
    if l.max_connections == 0 {
        return Err(invalid(
            "proxy.limits.max_connections",
            "must be above zero",
        ));
    }
    if admin.max_connections == 0 {
        return Err(invalid("admin.max_connections", "must be above zero"));
    }
    Ok(Limits {
        max_header_bytes: l.max_header_bytes,
        max_uri_bytes: l.max_uri_bytes,
        max_connections: l.max_connections,
        admin_max_connections: admin.max_connections,
    })
}

/// `proxy.timeouts`: all but `drain` must be above zero (zero would refuse everything).
fn timeouts(t: &RawTimeouts) -> Result<Timeouts> {
    for (name, d) in [
        ("proxy.timeouts.upstream", t.upstream),
        ("proxy.timeouts.header_read", t.header_read),
        ("proxy.timeouts.idle", t.idle),
        ("proxy.timeouts.write", t.write),
    ] {
        if d.0.is_zero() {
            return Err(invalid(name, "must be above zero"));
        }
    }
    Ok(Timeouts {
        upstream: t.upstream.0,
        header_read: t.header_read.0,
        idle: t.idle.0,
        write: t.write.0,
        drain: t.drain.0,
    })
}

/// `keys.prefixes`: no prefix may start another, or a key's type would be ambiguous.
/// `keys`: the prefixes and the pepper. Versions up to 0.1 ignored `KEYGATE_PEPPER` when the
/// file had no `keys:` section (their digests are plain SHA-256), so a pepper set there is
/// refused rather than guessed: using it would lock out keys made by such a version,
/// ignoring it would break the README's promise.
fn keys(keys: Option<&RawKeys>, env: &dyn Env) -> Result<(Prefixes, Option<SecretString>)> {
    let Some(keys) = keys else {
        if env.var(DEFAULT_PEPPER_ENV).is_some() {
            return Err(invalid(
                "keys",
                "KEYGATE_PEPPER is set but the file has no `keys:` section, where keygate \
                 0.1 ignored it (keys it made are digested without a pepper). Say which you \
                 mean: `keys: { pepper_env: KEYGATE_PEPPER }` to use it (keys made without \
                 it stop working), or `keys: { pepper_env: \"\" }` to go on without one",
            ));
        }
        return Ok((prefixes(&RawPrefixes::default())?, None));
    };
    let pepper = env.var(&keys.pepper_env).map(SecretString::from);
    Ok((prefixes(&keys.prefixes)?, pepper))
}

fn prefixes(p: &RawPrefixes) -> Result<Prefixes> {
    let prefixes = Prefixes {
        secret_live: p.secret_live.0.clone(),
        publishable_live: p.publishable_live.0.clone(),
        secret_test: p.secret_test.0.clone(),
        publishable_test: p.publishable_test.0.clone(),
    };
    let all = [
        &prefixes.secret_live,
        &prefixes.publishable_live,
        &prefixes.secret_test,
        &prefixes.publishable_test,
    ];
    for (i, a) in all.iter().enumerate() {
        for (j, b) in all.iter().enumerate() {
            if i != j && b.starts_with(a.as_str()) {
                return Err(invalid(
                    "keys.prefixes",
                    format!("prefix {a:?} is a prefix of {b:?}: keys would be ambiguous"),
                ));
            }
        }
    }
    Ok(prefixes)
}

/// `keys.legacy`: each format's name unique, its prefix one that no keygate prefix starts
/// (such tokens are read as keygate keys, so the format could never match), its lengths
/// within what import accepts and longer than the prefix.
fn legacy(keys: Option<&RawKeys>, prefixes: &Prefixes) -> Result<LegacyFormats> {
    let raw = keys.map_or(&[][..], |k| k.legacy.as_slice());
    let mut names = HashSet::new();
    let mut formats = Vec::with_capacity(raw.len());
    for (i, f) in raw.iter().enumerate() {
        let field = |name: &str| FieldPath::keys("keys.legacy").index(i).key(name);
        let format = legacy_format(f, prefixes, field)?;
        if !names.insert(format.name.clone()) {
            return Err(invalid(
                field("name"),
                format!("{:?} is used twice", f.name),
            ));
        }
        formats.push(format);
    }
    Ok(LegacyFormats::new(formats))
}

fn legacy_format(
    f: &RawLegacyFormat,
    prefixes: &Prefixes,
    field: impl Fn(&str) -> FieldPath,
) -> Result<LegacyFormat> {
    let name_ok = (1..=32).contains(&f.name.len())
        && f.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if !name_ok {
        return Err(invalid(field("name"), "use 1-32 characters of a-z 0-9 _ -"));
    }
    if f.prefix.len() > 64 || !f.prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field("prefix"),
            "use at most 64 visible ASCII characters (no spaces)",
        ));
    }
    if crate::key::has_keygate_prefix(prefixes, &f.prefix) {
        return Err(invalid(
            field("prefix"),
            format!(
                "{:?} starts with one of keys.prefixes: such tokens are read as keygate keys,                  so this format could never match; change keys.prefixes",
                f.prefix
            ),
        ));
    }
    let (lo, hi) = (
        *crate::key::LEGACY_LENGTHS.start(),
        *crate::key::LEGACY_LENGTHS.end(),
    );
    if f.min_length < lo.max(f.prefix.len() + 1) {
        return Err(invalid(
            field("min_length"),
            format!("use at least {lo} and more than the prefix's length"),
        ));
    }
    if f.max_length > hi || f.max_length < f.min_length {
        return Err(invalid(
            field("max_length"),
            format!("use min_length to {hi}"),
        ));
    }
    Ok(LegacyFormat {
        name: f.name.clone(),
        prefix: f.prefix.clone(),
        min_length: f.min_length,
        max_length: f.max_length,
        charset: f.charset,
    })
}

/// The root token: from `admin.root_token_env`, else `admin.root_token_file`. A short one
/// is refused naming where it came from (only the file has a line).
fn root_token(admin: &RawAdmin, env: &dyn Env) -> Result<Option<SecretString>> {
    let (token, refuse): (_, fn(&'static str) -> Invalid) = match env.var(&admin.root_token_env) {
        Some(t) => (t, |m| outside("admin.root_token", m)),
        None => match &admin.root_token_file {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        invalid("admin.root_token_file", format!("cannot read {path}: {e}"))
                    })?
                    .trim()
                    .to_string(),
                |m| invalid("admin.root_token_file", m),
            ),
            None => return Ok(None),
        },
    };
    if token.len() < 16 {
        return Err(refuse("the root token must be at least 16 characters"));
    }
    Ok(Some(SecretString::from(token)))
}

/// `proxy.upstream_ca`: read now, so a bad file is a config error and not a 502 later.
fn upstream_ca(proxy: &RawProxy) -> Result<Option<PathBuf>> {
    match &proxy.upstream_ca {
        None => Ok(None),
        Some(p) => {
            let path = PathBuf::from(p);
            crate::tls::load_roots(&path).map_err(|m| invalid("proxy.upstream_ca", m))?;
            Ok(Some(path))
        }
    }
}

/// `proxy.tls` or `admin.tls`: the pair must load now.
pub(super) fn tls_pair(field: &str, t: &Option<RawTls>) -> Result<Option<(PathBuf, PathBuf)>> {
    match t {
        None => Ok(None),
        Some(t) => {
            let pair = (PathBuf::from(&t.cert), PathBuf::from(&t.key));
            crate::tls::load_pair(&pair.0, &pair.1).map_err(|m| invalid(field, m))?;
            Ok(Some(pair))
        }
    }
}

/// `routes`, `unmatched` and the header half of `proxy`, compiled into the route table.
fn policy(proxy: &RawProxy, raw_routes: &[RawRoute], unmatched: Unmatched) -> Result<Policy> {
    let identity = identity_headers(&proxy.identity_headers)?;
    let mut seen = HashSet::new();
    let routes = raw_routes
        .iter()
        .enumerate()
        .map(|(i, r)| route(i, r, &mut seen))
        .collect::<Result<Vec<_>>>()?;
    let headers = HeaderPolicy {
        identity,
        forward_authorization: proxy.forward_authorization,
        trusted_proxies: proxy.trusted_proxies.iter().map(|n| n.0).collect(),
        default_max_body_bytes: match proxy.limits.max_body_bytes {
            0 => None,
            n => Some(n),
        },
        access_log: proxy.access_log,
        keep_underscore_headers: proxy.underscore_headers == UnderscoreHeaders::Keep,
        upgrades: upgrades(&proxy.upgrades)?,
        lifecycle: lifecycle(proxy)?,
    };
    let unmatched = match unmatched {
        Unmatched::Deny => policy::Unmatched::Deny,
        Unmatched::RequireKey => policy::Unmatched::RequireKey,
    };
    Ok(Policy::new(PolicySpec {
        routes,
        unmatched,
        headers,
    }))
}

/// Headers an identity header must not be: the upstream reads them as framing, routing
/// or client facts, and keygate sets or strips them itself.
const RESERVED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "http2-settings",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// `proxy.identity_headers`: four distinct names, none reserved nor one the proxy strips
/// from clients (a method override or a client address claim would carry the tenant or
/// the scopes to the upstream as something else; `x-keygate-ratelimit` is keygate's mark).
fn identity_headers(ih: &RawIdentityHeaders) -> Result<IdentityHeaders> {
    let identity = IdentityHeaders {
        key_id: ih.key_id.0.clone(),
        tenant: ih.tenant.0.clone(),
        scopes: ih.scopes.0.clone(),
        key_type: ih.key_type.0.clone(),
    };
    let mut names = HashSet::new();
    for (field, name) in [
        ("key_id", &identity.key_id),
        ("tenant", &identity.tenant),
        ("scopes", &identity.scopes),
        ("key_type", &identity.key_type),
    ] {
        let path = FieldPath::keys("proxy.identity_headers").key(field);
        // CGI, WSGI, Rack and PHP read `_` as `-` (as the proxy's own stripping does).
        let canon = name.as_str().replace('_', "-");
        let canon = canon.as_str();
        if RESERVED.contains(&canon) || OVERRIDES.contains(&canon) || CLIENT_CLAIMS.contains(&canon)
        {
            return Err(invalid(
                path,
                format!("{name} is reserved and cannot carry identity"),
            ));
        }
        if !names.insert(canon.to_string()) {
            return Err(invalid(path, format!("{name} is used twice")));
        }
    }
    Ok(identity)
}

/// `routes[i].name`: unique (it is a metrics label), metric-label safe, not reserved.
fn route_name(i: usize, name: &str, seen: &mut HashSet<String>) -> Result<()> {
    let field = || route_field(i, "name");
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !name_ok {
        return Err(invalid(
            field(),
            format!("invalid route name {name:?}: use 1-64 of A-Z a-z 0-9 _ . -"),
        ));
    }
    if !seen.insert(name.to_string()) {
        return Err(invalid(field(), format!("duplicate route name {name:?}")));
    }
    if name == crate::policy::UNMATCHED {
        return Err(invalid(field(), "\"unmatched\" is reserved"));
    }
    Ok(())
}

/// `routes[i]`: a valid name and settings that agree with each other.
fn route(i: usize, r: &RawRoute, seen: &mut HashSet<String>) -> Result<RouteSpec> {
    route_name(i, &r.name, seen)?;
    let field = |f: &str| route_field(i, f);
    let public = r.auth == Auth::None;
    if public && !r.scopes.is_empty() {
        return Err(invalid(
            field("scopes"),
            "a route with `auth: none` cannot require scopes",
        ));
    }
    if public && r.allow_publishable {
        return Err(invalid(
            field("allow_publishable"),
            "a route with `auth: none` lets everyone through already",
        ));
    }
    if r.methods.as_ref().is_some_and(|ms| ms.is_empty()) {
        return Err(invalid(
            field("methods"),
            "empty list: omit it to match all methods",
        ));
    }
    let cost = r.cost.unwrap_or(1);
    if public && (r.cost.is_some() || !r.rate_limits.is_empty()) {
        let f = if r.cost.is_some() {
            "cost"
        } else {
            "rate_limits"
        };
        return Err(invalid(
            field(f),
            "a route with `auth: none` has no key to count against",
        ));
    }
    if cost > 1_000_000 {
        return Err(invalid(field("cost"), "must be between 0 and 1000000"));
    }
    let rate_limits = route_limits(i, &r.rate_limits)?;
    Ok(RouteSpec {
        cost,
        rate_limits,
        name: r.name.clone(),
        methods: r
            .methods
            .as_ref()
            .map(|ms| ms.iter().map(|m| m.0.clone()).collect()),
        pattern: r.path.clone(),
        public,
        scopes: r.scopes.iter().map(|s| s.0.clone()).collect(),
        allow_publishable: r.allow_publishable,
        max_body_bytes: r.max_body_bytes,
    })
}

/// `routes[i].rate_limits`: at most 8, unique names, whole-second windows.
fn route_limits(i: usize, raw: &[RawRouteLimit]) -> Result<Vec<policy::RouteLimit>> {
    if raw.len() > 8 {
        return Err(invalid(
            route_field(i, "rate_limits"),
            "at most 8 limits a route",
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (j, l) in raw.iter().enumerate() {
        let field = |f: &str| route_field(i, "rate_limits").index(j).key(f);
        if !crate::key::valid_limit_name(&l.name) {
            return Err(invalid(
                field("name"),
                format!(
                    "invalid limit name {:?}: use 1-32 of a-z 0-9 _ . - (starting with a \
                     letter or digit), not \"credits\"",
                    l.name
                ),
            ));
        }
        if !seen.insert(l.name.as_str()) {
            return Err(invalid(
                field("name"),
                format!("duplicate limit name {:?}", l.name),
            ));
        }
        if !(1..=1_000_000_000_000).contains(&l.limit) {
            return Err(invalid(
                field("limit"),
                "must be between 1 and 1000000000000",
            ));
        }
        let ms = l.window.0.as_millis();
        if ms % 1000 != 0 || !(1000..=366 * 86_400_000).contains(&ms) {
            return Err(invalid(
                field("window"),
                "must be whole seconds, from 1s to 366d",
            ));
        }
        let by = match l.by {
            super::raw::RawLimitBy::Key => policy::LimitBy::Key,
            super::raw::RawLimitBy::Tenant => policy::LimitBy::Tenant,
        };
        out.push(policy::RouteLimit::new(&l.name, l.limit, ms as u64, by));
    }
    Ok(out)
}

/// `rate_limits`: the reloadable rules, and the sync interval (fixed: the exchange task
/// starts with it).
fn rate_limits(raw: &RawRateLimits) -> Result<(RateLimitRules, Duration)> {
    let interval = raw.sync_interval.0;
    if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&interval) {
        return Err(invalid(
            "rate_limits.sync_interval",
            "must be between 10ms and 10s",
        ));
    }
    let rules = RateLimitRules {
        exact: raw.mode == super::raw::LimitMode::Exact,
        deny_on_store_error: raw.on_store_error == super::raw::LimitOnStoreError::Deny,
        headers: raw.headers,
    };
    Ok((rules, interval))
}

/// `proxy.key_lifecycle_headers` and `proxy.sunset_window` (0 to 366 days).
fn lifecycle(proxy: &RawProxy) -> Result<policy::Lifecycle> {
    let window = proxy.sunset_window.0;
    if window > Duration::from_secs(366 * 86_400) {
        return Err(invalid("proxy.sunset_window", "must be at most 366d"));
    }
    Ok(policy::Lifecycle {
        headers: proxy.key_lifecycle_headers,
        sunset_window_ms: window.as_millis() as u64,
    })
}

/// `proxy.upgrades`: protocol names (RFC 9110 tokens), lower-cased; never `h2c`.
fn upgrades(list: &[String]) -> Result<Box<[Box<str>]>> {
    let field = "proxy.upgrades";
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        let token = !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(invalid(field, format!("{p:?} is not a protocol name")));
        }
        let p = p.to_ascii_lowercase();
        if p == "h2c" {
            return Err(invalid(
                field,
                "h2c cannot be tunnelled: RFC 9113 deprecates it, and the tunnel would bypass \
                 every route check",
            ));
        }
        out.push(p.into_boxed_str());
    }
    Ok(out.into())
}
