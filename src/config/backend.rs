//! `store.redis`: exactly one of `url` (standalone), `sentinel` or `cluster`, each
//! replaceable from the environment, and the replica acknowledgement it asks for.

use super::locate::FieldPath;
use super::raw::{RawCluster, RawRedis, RawSentinel};
use super::sections::{invalid, outside, Result};
use super::Env;
use crate::store::redis::{Mode, RedisSettings, SentinelSettings};
use std::path::PathBuf;
use std::time::Duration;

const URL_ENV: &str = "KEYGATE_REDIS_URL";
const SENTINEL_ENV: &str = "KEYGATE_REDIS_SENTINEL_NODES";
const MASTER_ENV: &str = "KEYGATE_REDIS_SENTINEL_MASTER";
const CLUSTER_ENV: &str = "KEYGATE_REDIS_CLUSTER_NODES";

/// More replicas than this is a typo, not a topology.
const MAX_REPLICAS_ACK: u32 = 16;

pub(super) fn redis(r: RawRedis, env: &dyn Env) -> Result<RedisSettings> {
    let namespace = namespace(&r.namespace)?;
    if r.timeout.0.is_zero() {
        return Err(invalid("store.redis.timeout", "must be above zero"));
    }
    let ca_file = r.ca_file.as_ref().map(PathBuf::from);
    if let Some(ca) = &ca_file {
        #[allow(clippy::disallowed_methods, reason = "config load, not a request path")]
        std::fs::read(ca).map_err(|e| {
            invalid(
                "store.redis.ca_file",
                format!("cannot read {}: {e}", ca.display()),
            )
        })?;
    }
    let mode = match from_env(env, r.sentinel.as_ref())? {
        Some(mode) => mode,
        None => from_file(r.url, r.sentinel, r.cluster, env)?,
    };
    let min_replicas_ack = match (r.min_replicas_ack, &mode) {
        (Some(n), _) if n > MAX_REPLICAS_ACK => {
            return Err(invalid(
                "store.redis.min_replicas_ack",
                format!("at most {MAX_REPLICAS_ACK}"),
            ))
        }
        (Some(n), _) => n,
        (None, Mode::Standalone { .. }) => 0,
        (None, _) => 1,
    };
    let ack_timeout = r.ack_timeout.0;
    // `WAIT` counts in whole milliseconds, and `WAIT n 0` would wait for ever.
    if ack_timeout < Duration::from_millis(1) || ack_timeout > Duration::from_secs(10) {
        return Err(invalid(
            "store.redis.ack_timeout",
            "must be at least 1ms and at most 10s",
        ));
    }
    Ok(RedisSettings {
        mode,
        namespace,
        timeout: r.timeout.0,
        ca_file,
        min_replicas_ack,
        ack_timeout,
    })
}

/// The namespace prefixes every key and channel name.
fn namespace(ns: &str) -> Result<String> {
    let ok = !ns.is_empty()
        && ns.len() <= 64
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'));
    if !ok {
        return Err(invalid(
            "store.redis.namespace",
            "use 1-64 characters of A-Z a-z 0-9 _ . - :",
        ));
    }
    Ok(ns.to_string())
}

/// A mode from the environment, which replaces the file's; at most one may be set.
fn from_env(env: &dyn Env, file_sentinel: Option<&RawSentinel>) -> Result<Option<Mode>> {
    let set: Vec<(&str, String)> = [URL_ENV, SENTINEL_ENV, CLUSTER_ENV]
        .into_iter()
        .filter_map(|name| env.var(name).map(|v| (name, v)))
        .collect();
    let (name, value) = match set.as_slice() {
        [] => return Ok(None),
        [one] => one.clone(),
        _ => {
            return Err(outside(
                set[0].0,
                format!("set only one of {URL_ENV}, {SENTINEL_ENV}, {CLUSTER_ENV}"),
            ))
        }
    };
    let list = |v: &str| -> Vec<String> {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mode = match name {
        URL_ENV => Mode::Standalone {
            url: url(&value).map_err(|m| outside(URL_ENV, m))?,
        },
        CLUSTER_ENV => Mode::Cluster {
            nodes: cluster_nodes(&list(&value), &|_, m| outside(CLUSTER_ENV, m))?,
        },
        _ => {
            let master_name = env
                .var(MASTER_ENV)
                .or_else(|| file_sentinel.map(|s| s.master_name.clone()))
                .ok_or_else(|| outside(MASTER_ENV, format!("must be set with {SENTINEL_ENV}")))?;
            let raw = RawSentinel {
                master_name,
                nodes: list(&value),
                password_env: file_sentinel.and_then(|s| s.password_env.clone()),
                sentinel_password_env: file_sentinel.and_then(|s| s.sentinel_password_env.clone()),
                tls: file_sentinel.is_some_and(|s| s.tls),
            };
            Mode::Sentinel(sentinel(raw, env)?)
        }
    };
    Ok(Some(mode))
}

fn from_file(
    url_field: Option<String>,
    sentinel_field: Option<RawSentinel>,
    cluster_field: Option<RawCluster>,
    env: &dyn Env,
) -> Result<Mode> {
    let one = "set exactly one of `url`, `sentinel` or `cluster`";
    match (url_field, sentinel_field, cluster_field) {
        (Some(u), None, None) => Ok(Mode::Standalone {
            url: url(&u).map_err(|m| invalid("store.redis.url", m))?,
        }),
        (None, Some(s), None) => Ok(Mode::Sentinel(sentinel(s, env)?)),
        (None, None, Some(c)) => {
            let at = |i: usize, m: String| {
                invalid(FieldPath::keys("store.redis.cluster.nodes").index(i), m)
            };
            Ok(Mode::Cluster {
                nodes: cluster_nodes(&c.nodes, &at)?,
            })
        }
        (None, None, None) => Err(invalid("store.redis", one)),
        (_, Some(_), _) => Err(invalid("store.redis.sentinel", one)),
        (_, _, Some(_)) => Err(invalid("store.redis.cluster", one)),
    }
}

fn url(url: &str) -> std::result::Result<String, String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err("must start with redis:// or rediss://".into());
    }
    if redis::Client::open(url).is_err() {
        return Err("is not a valid Redis URL".into());
    }
    Ok(url.to_string())
}

fn cluster_nodes(
    nodes: &[String],
    at: &dyn Fn(usize, String) -> super::sections::Invalid,
) -> Result<Vec<String>> {
    if nodes.is_empty() {
        return Err(at(0, "list at least one seed node".into()));
    }
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| url(n).map_err(|m| at(i, m)))
        .collect()
}

fn sentinel(s: RawSentinel, env: &dyn Env) -> Result<SentinelSettings> {
    let name_ok = !s.master_name.is_empty()
        && s.master_name.len() <= 64
        && s.master_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !name_ok {
        return Err(invalid(
            "store.redis.sentinel.master_name",
            "use 1-64 characters of A-Z a-z 0-9 _ . -",
        ));
    }
    if s.nodes.is_empty() {
        return Err(invalid(
            "store.redis.sentinel.nodes",
            "list at least one sentinel, host:port",
        ));
    }
    for (i, n) in s.nodes.iter().enumerate() {
        let ok = n.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            return Err(invalid(
                FieldPath::keys("store.redis.sentinel.nodes").index(i),
                "must be host:port",
            ));
        }
    }
    let secret = |field: &str, var: &Option<String>| -> Result<Option<String>> {
        let Some(var) = var else { return Ok(None) };
        match env.var(var) {
            Some(v) if !v.is_empty() => Ok(Some(v)),
            _ => Err(invalid(
                format!("store.redis.sentinel.{field}").as_str(),
                format!("the environment variable {var} is not set"),
            )),
        }
    };
    Ok(SentinelSettings {
        password: secret("password_env", &s.password_env)?,
        sentinel_password: secret("sentinel_password_env", &s.sentinel_password_env)?,
        master_name: s.master_name,
        nodes: s.nodes,
        tls: s.tls,
    })
}
