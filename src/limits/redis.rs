//! Rate-limit counters in Redis (standalone, Sentinel or Cluster): one Lua script per
//! decision, every key of it under one hash tag.
//!
//! Layout under namespace `ns`, for a tenant whose tag is `rl.<xxh3 of the tenant, hex16>`
//! (`limits::tag`):
//! - `ns:{rl.<tenant hash>}:<counter id>:<window>`  string: the count of one counter in one
//!   window (`Counter::store_key`), expiring two windows after it was first written
//!   (never for credits without refill)
//! - `ns:{rl.<tenant hash>}:u:<key id>:admitted`  string: the key's admitted requests
//! - `ns:{rl.<tenant hash>}:u:<key id>:refused`   string: the key's refused requests
//! - `ns:{rl.replicas}:replicas`  sorted set: the replicas exchanging in `local` mode, by
//!   the time of their last heartbeat (`local` defers a counter's exchange by their number)
//!
//! Why one tag per tenant: a request is decided all or nothing (admitted only if every
//! limit and the credits admit it, and then it spends on all of them), which one Lua script
//! can do atomically only when all its keys are in one Redis Cluster slot. The counters of a
//! request are the key's own and its tenant's, so the tag is the tenant's: every limit of
//! one tenant lives on one cluster node. The cost: a hot tenant's limits all load that one
//! node (tenants spread over the slots, one tenant does not).
//!
//! Scripts never read in one round trip and write in another: `take` reads every counter,
//! decides and spends in one `EVALSHA`. A key holding anything but a decimal count is
//! reported as `StoreError::Corrupt` and nothing is written.

use super::{Ask, Counter, Decision, Headroom, Kind, LimitStore, Outcome, Push};
use crate::store::{Scripts, StoreError};
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::{Script, Value};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

/// How many scripts of one `exchange` or `add_totals` run at the same time (one per tag).
const PARALLEL: usize = 8;
/// Keys one `ADD` script takes at most.
const CHUNK: usize = 1000;

/// `take`. KEYS: the request's counters, then its key's admitted and refused totals.
/// ARGV: quota of the current window, cost, ttl_ms (0: never expires) per counter.
/// Returns `{0, count...}` (admitted: every count after spending), `{i, count...}` (the
/// first refusing counter is `KEYS[i]`: nothing spent, the counts as read), or `{-1, i}`:
/// `KEYS[i]` does not hold a count, nothing written. A count is spent only when every
/// counter has room; the totals are written first, so a failing write changes nothing.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = #KEYS - 2
local counts = {}
local status = 0
for i = 1, n + 2 do
  local v = redis.call('GET', KEYS[i])
  local c = 0
  if v then
    if #v > 18 or not string.find(v, '^%d+$') then return {-1, i} end
    c = tonumber(v)
  end
  if i <= n then
    counts[i] = c
    if status == 0 and c + tonumber(ARGV[3 * i - 1]) > tonumber(ARGV[3 * i - 2]) then
      status = i
    end
  end
end
if status ~= 0 then
  redis.call('INCR', KEYS[n + 2])
  return {status, unpack(counts)}
end
redis.call('INCR', KEYS[n + 1])
for i = 1, n do
  if ARGV[3 * i - 1] ~= '0' then
    counts[i] = redis.call('INCRBY', KEYS[i], ARGV[3 * i - 1])
    if ARGV[3 * i] ~= '0' and redis.call('PTTL', KEYS[i]) < 0 then
      redis.call('PEXPIRE', KEYS[i], ARGV[3 * i])
    end
  end
end
return {0, unpack(counts)}
",
    )
});

/// `peek`, `totals`: `{0, count...}` (missing: 0), or `{-1, i}`: `KEYS[i]` is no count.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local counts = {}
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  local c = 0
  if v then
    if #v > 18 or not string.find(v, '^%d+$') then return {-1, i} end
    c = tonumber(v)
  end
  counts[i] = c
end
return {0, unpack(counts)}
",
    )
});

/// `exchange`, `add_totals`. ARGV: delta, ttl_ms (0: never expires) per key. Adds each
/// delta (the expiry is set only on a key without one: a window is never extended) and
/// returns `{0, total...}`; `{-1, i}`: `KEYS[i]` is no count, nothing written.
static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and (#v > 18 or not string.find(v, '^%d+$')) then return {-1, i} end
end
local totals = {}
for i = 1, #KEYS do
  if ARGV[2 * i - 1] ~= '0' then
    totals[i] = redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
    if ARGV[2 * i] ~= '0' and redis.call('PTTL', KEYS[i]) < 0 then
      redis.call('PEXPIRE', KEYS[i], ARGV[2 * i])
    end
  else
    totals[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
end
return {0, unpack(totals)}
",
    )
});

/// `retire`. ARGV: the expiry (ms). A count without one gets it; others are left alone.
static RETIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 1, #KEYS do
  if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 0
",
    )
});

/// `replicas`. KEYS: the replicas' set. ARGV: this replica's id, how long (ms) a replica
/// counts after its last call. Returns how many count, this one included. Redis' clock,
/// not the replicas': theirs may disagree.
static REPLICAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
",
    )
});

/// Counters in Redis, through the key store's connection (`KeyStore::scripts`).
pub struct RedisLimits {
    scripts: Arc<dyn Scripts>,
}

impl RedisLimits {
    pub fn new(scripts: Arc<dyn Scripts>) -> Self {
        Self { scripts }
    }

    fn counter_keys(&self, ask: &Ask, now_ms: u64) -> Vec<String> {
        let ns = self.scripts.namespace();
        ask.counters
            .iter()
            .map(|c| c.store_key(ns, &ask.tag, now_ms))
            .collect()
    }

    /// Run `ADD` once per hash tag (at most `CHUNK` keys a script, `PARALLEL` scripts at a
    /// time); the totals in input order, `Err` for the pushes of a script that failed.
    async fn add_each(
        &self,
        keys: &[String],
        deltas: &[(u64, u64)],
    ) -> Vec<Result<u64, Arc<StoreError>>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_slot: HashMap<&str, usize> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            let g = *by_slot.entry(hashed_part(k)).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
            // Lua's `unpack` stops at about 8,000 values: a busy tag takes several scripts.
            if groups[g].len() == CHUNK {
                by_slot.remove(hashed_part(k));
            }
        }
        let runs = groups.into_iter().map(|members| async move {
            let ks: Vec<String> = members.iter().map(|&i| keys[i].clone()).collect();
            let args: Vec<String> = members
                .iter()
                .flat_map(|&i| [deltas[i].0.to_string(), deltas[i].1.to_string()])
                .collect();
            let result = match self.scripts.eval(&ADD, &ks, &args).await {
                Ok(reply) => parse(reply, &ks, ks.len()).map(|(_, totals)| totals),
                Err(e) => Err(e),
            };
            (members, result.map_err(Arc::new))
        });
        let done: Vec<_> = futures_util::stream::iter(runs)
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut out: Vec<Result<u64, Arc<StoreError>>> =
            vec![Err(Arc::new(StoreError::Timeout)); keys.len()];
        for (members, result) in done {
            match result {
                Ok(totals) if totals.len() == members.len() => {
                    for (i, t) in members.into_iter().zip(totals) {
                        out[i] = Ok(t);
                    }
                }
                Ok(_) => {
                    let e = Arc::new(corrupt(keys, "a total for each key"));
                    members.into_iter().for_each(|i| out[i] = Err(e.clone()));
                }
                Err(e) => members.into_iter().for_each(|i| out[i] = Err(e.clone())),
            }
        }
        out
    }

    /// `add_each`, all or nothing: the first error when any script failed (some others
    /// may have been applied).
    async fn add(&self, keys: &[String], deltas: &[(u64, u64)]) -> Result<Vec<u64>, StoreError> {
        let each = self.add_each(keys, deltas).await;
        let mut out = Vec::with_capacity(each.len());
        for r in each {
            match r {
                Ok(t) => out.push(t),
                Err(e) => return Err(Arc::try_unwrap(e).unwrap_or_else(|e| copy_error(&e))),
            }
        }
        Ok(out)
    }
}

/// A `StoreError` shared by several pushes, as one of its own.
fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Timeout => StoreError::Timeout,
        StoreError::Corrupt { key, reason } => StoreError::Corrupt {
            key: key.clone(),
            reason: reason.clone(),
        },
        other => StoreError::Unavailable(other.to_string()),
    }
}

#[async_trait]
impl LimitStore for RedisLimits {
    async fn take(&self, ask: &Ask, now_ms: u64) -> Result<Outcome, StoreError> {
        if ask.counters.is_empty() {
            return Ok(admit_nothing());
        }
        let mut keys = self.counter_keys(ask, now_ms);
        keys.extend(totals_keys(self.scripts.namespace(), &ask.tag, &ask.key_id));
        let args: Vec<String> = ask
            .counters
            .iter()
            .flat_map(|c| {
                [
                    c.quota_of(c.window(now_ms)).to_string(),
                    c.cost.to_string(),
                    c.ttl_ms().to_string(),
                ]
            })
            .collect();
        let reply = self.scripts.eval(&TAKE, &keys, &args).await?;
        let n = ask.counters.len();
        let (status, counts) = parse(reply, &keys, n)?;
        let decision = if status == 0 {
            Decision::Admit
        } else {
            // `status` is the first refusing counter; the others are found here.
            let first = usize::try_from(status)
                .ok()
                .and_then(|s| s.checked_sub(1))
                .filter(|&i| i < n)
                .ok_or_else(|| corrupt(&keys, "refusing counter out of range"))?;
            decide(ask, now_ms, &counts, Some(first))
        };
        Ok(Outcome {
            decision,
            counters: headroom(ask, now_ms, &counts),
        })
    }

    async fn exchange(&self, pushes: &[Push]) -> Result<Vec<u64>, StoreError> {
        if pushes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = pushes.iter().map(|p| p.key.clone()).collect();
        let deltas: Vec<(u64, u64)> = pushes.iter().map(|p| (p.delta, p.ttl_ms)).collect();
        self.add(&keys, &deltas).await
    }

    async fn exchange_each(&self, pushes: &[Push]) -> Vec<Option<u64>> {
        let keys: Vec<String> = pushes.iter().map(|p| p.key.clone()).collect();
        let deltas: Vec<(u64, u64)> = pushes.iter().map(|p| (p.delta, p.ttl_ms)).collect();
        let each = self.add_each(&keys, &deltas).await;
        if let Some(Err(e)) = each.iter().find(|r| r.is_err()) {
            tracing::warn!(error = %e, "part of a rate-limit exchange failed");
        }
        each.into_iter().map(Result::ok).collect()
    }

    async fn peek(&self, ask: &Ask, now_ms: u64) -> Result<Outcome, StoreError> {
        if ask.counters.is_empty() {
            return Ok(admit_nothing());
        }
        let keys = self.counter_keys(ask, now_ms);
        let reply = self.scripts.eval(&READ, &keys, &[]).await?;
        let (_, counts) = parse(reply, &keys, keys.len())?;
        Ok(Outcome {
            decision: decide(ask, now_ms, &counts, None),
            counters: headroom(ask, now_ms, &counts),
        })
    }

    async fn totals(&self, tag: &str, key_id: &str) -> Result<(u64, u64), StoreError> {
        let keys = totals_keys(self.scripts.namespace(), tag, key_id);
        let reply = self.scripts.eval(&READ, &keys, &[]).await?;
        match parse(reply, &keys, 2)?.1[..] {
            [admitted, refused] => Ok((admitted, refused)),
            _ => Err(corrupt(&keys, "expected two totals")),
        }
    }

    async fn add_totals(&self, adds: &[(String, String, u64, u64)]) -> Result<(), StoreError> {
        let ns = self.scripts.namespace();
        let mut keys = Vec::new();
        let mut deltas = Vec::new();
        for (tag, key_id, admitted, refused) in adds {
            let [a, r] = totals_keys(ns, tag, key_id);
            for (key, n) in [(a, *admitted), (r, *refused)] {
                if n > 0 {
                    keys.push(key);
                    deltas.push((n, 0));
                }
            }
        }
        if !keys.is_empty() {
            self.add(&keys, &deltas).await?;
        }
        Ok(())
    }

    async fn replicas(&self, me: &str, within_ms: u64) -> Result<Option<u64>, StoreError> {
        let key = [format!(
            "{}:{{rl.replicas}}:replicas",
            self.scripts.namespace()
        )];
        let args = [me.to_string(), within_ms.to_string()];
        match self.scripts.eval(&REPLICAS, &key, &args).await? {
            Value::Int(n) if n >= 1 => Ok(Some(n as u64)),
            _ => Err(corrupt(&key, "expected a replica count")),
        }
    }

    async fn retire(&self, ask: &Ask, now_ms: u64, after_ms: u64) -> Result<(), StoreError> {
        if ask.counters.is_empty() {
            return Ok(());
        }
        let keys = self.counter_keys(ask, now_ms);
        let after = after_ms.max(1).to_string();
        self.scripts.eval(&RETIRE, &keys, &[after]).await.map(drop)
    }
}

/// The admitted and refused totals of a key.
pub(super) fn totals_keys(namespace: &str, tag: &str, key_id: &str) -> [String; 2] {
    [
        format!("{namespace}:{{{tag}}}:u:{key_id}:admitted"),
        format!("{namespace}:{{{tag}}}:u:{key_id}:refused"),
    ]
}

/// The part of a key Redis Cluster hashes: the text between the first `{` and the next
/// `}` when not empty, else the whole key.
fn hashed_part(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key)
}

fn admit_nothing() -> Outcome {
    Outcome {
        decision: Decision::Admit,
        counters: Vec::new(),
    }
}

/// Whether counter `c` with count `count` has no room for its cost at `now_ms`.
fn refuses(c: &Counter, count: u64, now_ms: u64) -> bool {
    count.saturating_add(c.cost) > c.quota_of(c.window(now_ms))
}

/// The decision for counts as read (nothing spent): `Admit` when every counter has room;
/// `Limited` when a rate limit refuses (retry when the last refusing window ends: a retry
/// then may succeed even if credits refuse too); else `NoCredits`. `first`: a counter
/// known to refuse (the script's answer).
pub(super) fn decide(ask: &Ask, now_ms: u64, counts: &[u64], first: Option<usize>) -> Decision {
    let mut limited: Option<u64> = None;
    let mut credits: Option<Option<u64>> = None;
    for (i, (c, &count)) in ask.counters.iter().zip(counts).enumerate() {
        if first != Some(i) && !refuses(c, count, now_ms) {
            continue;
        }
        let reset = c.reset_in(now_ms);
        match c.kind {
            Kind::RateLimit => limited = Some(limited.map_or(reset, |m| m.max(reset))),
            Kind::Credits => {
                let refill = (c.period_ms != u64::MAX).then_some(reset);
                credits = Some(match credits {
                    None => refill,
                    Some(prev) => prev.zip(refill).map(|(a, b)| a.max(b)),
                });
            }
        }
    }
    match (limited, credits) {
        (Some(retry_after_ms), _) => Decision::Limited { retry_after_ms },
        (None, Some(retry_after_ms)) => Decision::NoCredits { retry_after_ms },
        (None, None) => Decision::Admit,
    }
}

/// Every counter's state for these counts.
pub(super) fn headroom(ask: &Ask, now_ms: u64, counts: &[u64]) -> Vec<Headroom> {
    ask.counters
        .iter()
        .zip(counts)
        .map(|(c, &count)| {
            let quota = c.quota_of(c.window(now_ms));
            Headroom {
                kind: c.kind,
                quota,
                remaining: quota.saturating_sub(count),
                reset_ms: c.reset_in(now_ms),
                period_ms: c.period_ms,
            }
        })
        .collect()
}

fn corrupt(keys: &[String], reason: &str) -> StoreError {
    StoreError::Corrupt {
        key: keys.first().cloned().unwrap_or_default(),
        reason: reason.to_string(),
    }
}

/// A script's `{status, n counts}` reply; `{-1, i}` is `KEYS[i]` holding no count.
fn parse(reply: Value, keys: &[String], n: usize) -> Result<(i64, Vec<u64>), StoreError> {
    let items = match reply {
        Value::Array(items) => items,
        Value::ServerError(e) => {
            return Err(StoreError::Unavailable(
                redis::RedisError::from(e).to_string(),
            ))
        }
        _ => return Err(corrupt(keys, "script reply is not an array")),
    };
    let ints: Option<Vec<i64>> = items
        .iter()
        .map(|v| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        })
        .collect();
    match ints.as_deref() {
        Some(&[-1, i]) => Err(StoreError::Corrupt {
            key: i
                .checked_sub(1)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| keys.get(i))
                .or(keys.first())
                .cloned()
                .unwrap_or_default(),
            reason: "not a count".to_string(),
        }),
        Some([status, counts @ ..]) if *status >= 0 && counts.len() == n => counts
            .iter()
            .map(|&c| u64::try_from(c).ok())
            .collect::<Option<Vec<u64>>>()
            .map(|counts| (*status, counts))
            .ok_or_else(|| corrupt(keys, "negative count")),
        _ => Err(corrupt(keys, "unexpected script reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_part_is_what_redis_cluster_hashes() {
        assert_eq!(hashed_part("ns:{rl.ab}:k:x:1"), "rl.ab");
        assert_eq!(hashed_part("ns:{}:k"), "ns:{}:k");
        assert_eq!(hashed_part("ns:k"), "ns:k");
        assert_eq!(hashed_part("ns:{a"), "ns:{a");
        assert_eq!(hashed_part("a{b}{c}"), "b");
    }

    #[test]
    fn replies_of_another_shape_are_corrupt_not_a_panic() {
        let keys = vec!["k1".to_string(), "k2".to_string()];
        let int = Value::Int;
        for bad in [
            Value::Nil,
            Value::Int(3),
            Value::Array(vec![]),
            Value::Array(vec![int(0), int(1)]),
            Value::Array(vec![int(0), int(1), int(2), int(3)]),
            Value::Array(vec![int(0), int(-4), int(2)]),
            Value::Array(vec![int(-2), int(1), int(2)]),
            Value::Array(vec![int(0), Value::Nil, int(2)]),
            Value::Array(vec![int(-1), int(7)]),
            Value::Array(vec![int(-1), int(i64::MIN)]),
        ] {
            assert!(
                matches!(
                    parse(bad.clone(), &keys, 2),
                    Err(StoreError::Corrupt { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse(Value::Array(vec![int(2), int(1), int(5)]), &keys, 2).unwrap(),
            (2, vec![1, 5])
        );
    }
}
