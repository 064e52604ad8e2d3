//! Loading and validating configuration: YAML (strict) -> `RawConfig` -> typed `Config`.
//! Errors name the file, the field path and, where the YAML parser knows it, the line.

pub mod raw;
pub mod reload;

use crate::key::Prefixes;
use crate::policy::Policy;
use crate::store::redis::RedisSettings;
use raw::RawConfig;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A refused configuration: which file, which field, which line, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub field: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Redis(RedisSettings),
    Memory,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub upstream: Duration,
    pub header_read: Duration,
    pub idle: Duration,
    pub write: Duration,
    pub drain: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub max_connections: usize,
    pub admin_max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub max_entries: u64,
    pub on_store_error: raw::OnStoreError,
}

/// The root token, kept out of `Debug`.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: String,
    pub proxy_listen: SocketAddr,
    /// Proxy worker threads (`proxy.workers` resolved).
    pub proxy_workers: usize,
    pub admin_listen: SocketAddr,
    pub upstream: raw::Upstream,
    /// Trusted CA file for an `https://` upstream (system roots when absent).
    pub upstream_ca: Option<std::path::PathBuf>,
    /// Certificate and key files of the proxy listener's TLS.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Certificate and key files of the admin listener's TLS.
    pub admin_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub root_token: Option<Secret>,
    pub default_tenant: String,
    pub store: StoreConfig,
    pub last_used_interval: Duration,
    pub cache: CacheConfig,
    pub prefixes: Prefixes,
    pub pepper: Option<Secret>,
    /// Routes and header policy: the part that hot reload swaps.
    pub policy: Arc<Policy>,
}

/// Where environment overrides come from (the process environment, or a map in tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

impl Config {
    /// Read and validate a file, with overrides from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: source.clone(),
            field: String::new(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::from_yaml(&text, &source, &ProcessEnv)
    }

    /// Parse and validate YAML text. `source` names it in errors.
    pub fn from_yaml(text: &str, source: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.location().map(|l| l.line());
            let mut message = inner.to_string();
            // The YAML error repeats the position; keep the message itself.
            if let Some(i) = message.find(" at line ") {
                message.truncate(i);
            }
            ConfigError {
                source: source.to_string(),
                field: if field == "." { String::new() } else { field },
                line,
                message,
            }
        })?;
        validate(raw, source, env)
    }
}

fn validate(raw: RawConfig, source: &str, env: &dyn Env) -> Result<Config, ConfigError> {
    let err = |field: &str, message: String| ConfigError {
        source: source.to_string(),
        field: field.to_string(),
        line: None,
        message,
    };

    let proxy_listen = env
        .var("KEYGATE_PROXY_LISTEN")
        .map(|v| {
            v.parse()
                .map_err(|e| err("KEYGATE_PROXY_LISTEN", format!("{e}")))
        })
        .transpose()?
        .unwrap_or(raw.proxy.listen);
    let admin_listen = env
        .var("KEYGATE_ADMIN_LISTEN")
        .map(|v| {
            v.parse()
                .map_err(|e| err("KEYGATE_ADMIN_LISTEN", format!("{e}")))
        })
        .transpose()?
        .unwrap_or(raw.admin.listen);
    if proxy_listen.port() != 0
        && proxy_listen.port() == admin_listen.port()
        && (proxy_listen.ip() == admin_listen.ip()
            || proxy_listen.ip().is_unspecified()
            || admin_listen.ip().is_unspecified())
    {
        return Err(err(
            "admin.listen",
            "the admin API must not share the proxy's address".into(),
        ));
    }
    let upstream = match env.var("KEYGATE_UPSTREAM") {
        Some(v) => raw::Upstream::parse(&v).map_err(|m| err("KEYGATE_UPSTREAM", m))?,
        None => raw.proxy.upstream.clone(),
    };

    let last_used_interval = raw.store.last_used_interval.0;
    let store = match (raw.store.redis, raw.store.memory) {
        (Some(r), None) => {
            let url = env.var("KEYGATE_REDIS_URL").unwrap_or(r.url);
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(err("store.redis.url", "must start with redis://".into()));
            }
            if redis::Client::open(url.as_str()).is_err() {
                return Err(err("store.redis.url", "is not a valid Redis URL".into()));
            }
            let ns_ok = !r.namespace.is_empty()
                && r.namespace.len() <= 64
                && r.namespace
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'));
            if !ns_ok {
                return Err(err(
                    "store.redis.namespace",
                    "use 1-64 characters of A-Z a-z 0-9 _ . - :".into(),
                ));
            }
            if r.timeout.0.is_zero() {
                return Err(err("store.redis.timeout", "must be above zero".into()));
            }
            let ca_file = r.ca_file.as_ref().map(std::path::PathBuf::from);
            if let Some(ca) = &ca_file {
                std::fs::read(ca).map_err(|e| {
                    err(
                        "store.redis.ca_file",
                        format!("cannot read {}: {e}", ca.display()),
                    )
                })?;
            }
            StoreConfig::Redis(RedisSettings {
                url,
                namespace: r.namespace,
                timeout: r.timeout.0,
                ca_file,
            })
        }
        (None, Some(_)) => StoreConfig::Memory,
        _ => {
            return Err(err(
                "store",
                "set exactly one of `redis` or `memory`".into(),
            ))
        }
    };

    if raw.store.last_used_interval.0 < Duration::from_millis(10) {
        return Err(err(
            "store.last_used_interval",
            "must be at least 10ms".into(),
        ));
    }
    if raw.cache.ttl.0.is_zero() {
        return Err(err("cache.ttl", "must be above zero".into()));
    }
    if raw.cache.negative_ttl.0 > raw.cache.ttl.0 {
        return Err(err(
            "cache.negative_ttl",
            "must not exceed cache.ttl".into(),
        ));
    }
    if raw.cache.max_entries == 0 {
        return Err(err("cache.max_entries", "must be above zero".into()));
    }

    let l = &raw.proxy.limits;
    if !(8192..=1 << 20).contains(&l.max_header_bytes) {
        return Err(err(
            "proxy.limits.max_header_bytes",
            "must be between 8192 and 1048576".into(),
        ));
    }
    if !(64..=1 << 20).contains(&l.max_uri_bytes) {
        return Err(err(
            "proxy.limits.max_uri_bytes",
            "must be between 64 and 1048576".into(),
        ));
    }
    if l.max_connections == 0 {
        return Err(err(
            "proxy.limits.max_connections",
            "must be above zero".into(),
        ));
    }
    if raw.admin.max_connections == 0 {
        return Err(err("admin.max_connections", "must be above zero".into()));
    }
    let t = &raw.proxy.timeouts;
    for (name, d) in [
        ("proxy.timeouts.upstream", t.upstream),
        ("proxy.timeouts.header_read", t.header_read),
        ("proxy.timeouts.idle", t.idle),
        ("proxy.timeouts.write", t.write),
    ] {
        if d.0.is_zero() {
            return Err(err(name, "must be above zero".into()));
        }
    }

    let p = &raw.keys.prefixes;
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
                return Err(err(
                    "keys.prefixes",
                    format!("prefix {a:?} is a prefix of {b:?}: keys would be ambiguous"),
                ));
            }
        }
    }

    let root_token = match env.var(&raw.admin.root_token_env) {
        Some(t) => Some(t),
        None => match &raw.admin.root_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| err("admin.root_token_file", format!("cannot read {path}: {e}")))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        },
    };
    if let Some(t) = &root_token {
        if t.len() < 16 {
            return Err(err(
                "admin.root_token",
                "the root token must be at least 16 characters".into(),
            ));
        }
    }
    let pepper = env.var(&raw.keys.pepper_env).map(Secret);

    let upstream_ca = match &raw.proxy.upstream_ca {
        None => None,
        Some(p) => {
            let path = std::path::PathBuf::from(p);
            crate::tls::load_roots(&path).map_err(|m| err("proxy.upstream_ca", m))?;
            Some(path)
        }
    };
    let tls_pair = |field: &str, t: &Option<raw::RawTls>| match t {
        None => Ok(None),
        Some(t) => {
            let pair = (
                std::path::PathBuf::from(&t.cert),
                std::path::PathBuf::from(&t.key),
            );
            crate::tls::load_pair(&pair.0, &pair.1).map_err(|m| err(field, m))?;
            Ok(Some(pair))
        }
    };
    let tls = tls_pair("proxy.tls", &raw.proxy.tls)?;
    let admin_tls = tls_pair("admin.tls", &raw.admin.tls)?;
    let policy = Policy::build(&raw.proxy, &raw.routes, raw.unmatched)
        .map_err(|(field, message)| err(&field, message))?;

    Ok(Config {
        source: source.to_string(),
        proxy_listen,
        proxy_workers: raw.proxy.workers.resolve(),
        admin_listen,
        upstream,
        upstream_ca,
        tls,
        admin_tls,
        timeouts: Timeouts {
            upstream: t.upstream.0,
            header_read: t.header_read.0,
            idle: t.idle.0,
            write: t.write.0,
            drain: t.drain.0,
        },
        limits: Limits {
            max_header_bytes: l.max_header_bytes,
            max_uri_bytes: l.max_uri_bytes,
            max_connections: l.max_connections,
            admin_max_connections: raw.admin.max_connections,
        },
        root_token: root_token.map(Secret),
        default_tenant: raw.admin.default_tenant.0,
        store,
        last_used_interval,
        cache: CacheConfig {
            ttl: raw.cache.ttl.0,
            negative_ttl: raw.cache.negative_ttl.0,
            max_entries: raw.cache.max_entries,
            on_store_error: raw.cache.on_store_error,
        },
        prefixes,
        pepper,
        policy: Arc::new(policy),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "
proxy:
  listen: 127.0.0.1:8080
  upstream: http://127.0.0.1:3000
store:
  memory: {}
routes:
  - { name: health, path: /healthz, auth: none }
  - { name: users, methods: [GET], path: \"/users/**\", scopes: [\"users:read\"] }
";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, "test.yaml", &[("X", "Y")])
    }

    #[test]
    fn the_base_config_loads() {
        let c = load(BASE).unwrap();
        assert_eq!(c.policy.routes().len(), 2);
        assert_eq!(c.cache.ttl, Duration::from_secs(300));
        assert!(matches!(c.store, StoreConfig::Memory));
    }

    #[test]
    fn errors_name_field_and_line() {
        let e = load(&BASE.replace(
            "listen: 127.0.0.1:8080",
            "listen: 127.0.0.1:8080\n  lisen: x",
        ))
        .unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("unknown field `lisen`"), "{e}");

        let e = load(&format!("{BASE}cache: {{ ttl: 5 parsecs }}\n")).unwrap_err();
        assert_eq!(e.field, "cache.ttl", "{e}");
        assert_eq!(e.line, Some(10), "{e}");
        assert!(
            e.to_string().starts_with("test.yaml:10: field `cache.ttl`"),
            "{e}"
        );

        let e = load(&BASE.replace("users:read", "Users Read")).unwrap_err();
        assert_eq!(e.field, "routes[1].scopes[0]", "{e}");

        let e = load(&BASE.replace("\"/users/**\"", "\"/users/**/x\"")).unwrap_err();
        assert_eq!(e.field, "routes[1].path", "{e}");

        let e = load(&BASE.replace("memory: {}", "memory: {}\n  redis: { url: redis://x }"))
            .unwrap_err();
        assert_eq!(e.field, "store", "{e}");

        let e = load(&BASE.replace("name: users", "name: health")).unwrap_err();
        assert!(e.field.starts_with("routes[1].name"), "{e}");

        let e = load(&format!("{BASE}admin: {{ listen: 127.0.0.1:8080 }}\n")).unwrap_err();
        assert_eq!(e.field, "admin.listen", "{e}");
    }

    #[test]
    fn proxy_workers_are_auto_or_a_sane_count() {
        let with = |v: &str| {
            load(&BASE.replace(
                "listen: 127.0.0.1:8080",
                &format!("listen: 127.0.0.1:8080\n  workers: {v}"),
            ))
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(load(BASE).unwrap().proxy_workers, cpus);
        assert_eq!(with("auto").unwrap().proxy_workers, cpus);
        assert_eq!(with("3").unwrap().proxy_workers, 3);
        for bad in ["0", "-1", "5000", "lots", "1.5"] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.field, "proxy.workers", "{bad}: {e}");
            assert_eq!(e.line, Some(4), "{bad}: {e}");
        }
    }

    #[test]
    fn environment_overrides() {
        let text = BASE.replace("memory: {}", "redis: { url: \"redis://127.0.0.1:1/0\" }");
        let c = Config::from_yaml(
            &text,
            "t",
            &[
                ("KEYGATE_REDIS_URL", "redis://10.0.0.1:6380/2"),
                ("KEYGATE_ROOT_TOKEN", "0123456789abcdef0123"),
            ],
        )
        .unwrap();
        match c.store {
            StoreConfig::Redis(r) => assert_eq!(r.url, "redis://10.0.0.1:6380/2"),
            StoreConfig::Memory => panic!("expected redis"),
        }
        assert_eq!(c.root_token.unwrap().0, "0123456789abcdef0123");
        let e = Config::from_yaml(BASE, "t", &[("KEYGATE_ROOT_TOKEN", "short")]).unwrap_err();
        assert_eq!(e.field, "admin.root_token");
    }

    #[test]
    fn shipped_configs_are_valid() {
        for f in ["config/keygate.yaml", "config/dev.yaml"] {
            let text =
                std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_string() + f)
                    .unwrap();
            Config::from_yaml(&text, f, &[("X", "Y")]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Property tests: a config file is operator input, but a mangled one (a bad merge, a
/// template gone wrong) must be an error with a message, never a panic.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const SHIPPED: &str = include_str!("../../config/keygate.yaml");
    const ENV: [(&str, &str); 2] = [
        ("KEYGATE_ROOT_TOKEN", "0123456789abcdef0123"),
        ("KEYGATE_PEPPER", "pepper-pepper-pepper"),
    ];

    /// YAML syntax, values at and past the edges of what fields accept, and config words.
    const TOKENS: &[&str] = &[
        ": ",
        "- ",
        "{",
        "}",
        "[",
        "]",
        "\"",
        "'",
        "#",
        "\n",
        "  ",
        ",",
        "0",
        "-1",
        "65536",
        "18446744073709551616",
        "1ms",
        "0s",
        "5 parsecs",
        "null",
        "~",
        "true",
        "&a ",
        "*a",
        "<<: *a",
        "!!binary ",
        "/**",
        "/a;b",
        "/%2e",
        "..",
        "*",
        "users:read",
        "Users Read",
        "redis://",
        "memory: {}",
        "redis: {}",
        "auth: none",
        "scopes: []",
        "methods: []",
        "unmatched: require_key",
        "é",
        "\t",
        "\u{0}",
        "0.0.0.0:0",
        "[::1]:99999",
        "x-keygate-key-id",
        "authorization",
        "host",
        "workers: 0",
        "max_body_bytes: ",
    ];

    #[derive(Debug, Clone)]
    enum Edit {
        Delete(prop::sample::Index, usize),
        Insert(prop::sample::Index, &'static str),
        ReplaceLine(prop::sample::Index, &'static str),
        DuplicateLine(prop::sample::Index),
        SwapLines(prop::sample::Index, prop::sample::Index),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let token = prop::sample::select(TOKENS);
        prop_oneof![
            (any::<prop::sample::Index>(), 1..40usize).prop_map(|(i, n)| Edit::Delete(i, n)),
            (any::<prop::sample::Index>(), token.clone()).prop_map(|(i, t)| Edit::Insert(i, t)),
            (any::<prop::sample::Index>(), token).prop_map(|(i, t)| Edit::ReplaceLine(i, t)),
            any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
            (any::<prop::sample::Index>(), any::<prop::sample::Index>())
                .prop_map(|(a, b)| Edit::SwapLines(a, b)),
        ]
    }

    fn apply(text: &str, edit: &Edit) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        let mut lines: Vec<&str> = text.lines().collect();
        match edit {
            Edit::Delete(at, n) => {
                let i = at.index(chars.len() + 1);
                chars.drain(i..(i + n).min(chars.len()));
            }
            Edit::Insert(at, t) => {
                let i = at.index(chars.len() + 1);
                chars.splice(i..i, t.chars());
            }
            Edit::ReplaceLine(at, t) if !lines.is_empty() => {
                let i = at.index(lines.len());
                lines[i] = t;
                return lines.join("\n");
            }
            Edit::DuplicateLine(at) if !lines.is_empty() => {
                let i = at.index(lines.len());
                lines.insert(i, lines[i]);
                return lines.join("\n");
            }
            Edit::SwapLines(a, b) if !lines.is_empty() => {
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
                return lines.join("\n");
            }
            _ => {}
        }
        chars.into_iter().collect()
    }

    fn check(text: &str) -> Result<(), TestCaseError> {
        if let Err(e) = Config::from_yaml(text, "fuzz.yaml", &ENV) {
            prop_assert!(!e.message.trim().is_empty(), "no message: {:?}", e);
            prop_assert!(e.to_string().starts_with("fuzz.yaml"), "{}", e);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn a_mangled_shipped_config_loads_or_says_why(
            edits in prop::collection::vec(edit(), 1..5)
        ) {
            let text = edits.iter().fold(SHIPPED.to_string(), |t, e| apply(&t, e));
            check(&text)?;
        }

        #[test]
        fn arbitrary_text_loads_or_says_why(
            text in prop_oneof![
                any::<String>(),
                prop::collection::vec(prop::sample::select(TOKENS), 0..30).prop_map(|t| t.concat()),
            ]
        ) {
            check(&text)?;
        }
    }
}
