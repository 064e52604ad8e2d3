//! Revocation propagation on a replicated Redis, and what a failover costs.
//!
//! Sentinel mode (default): one primary, one replica (`--replicaof`), three sentinels
//! (`sentinel monitor mymaster 127.0.0.1 <port> 2`, down-after 1000 ms, failover-timeout
//! 3000 ms) and four keygate processes on `store.redis.sentinel` (min_replicas_ack 1),
//! plus a fifth with min_replicas_ack 0 for the write comparison. Keys are revoked on A's
//! admin port; we measure until each of B, C, D (whose caches hold the key) refuses it.
//! Then the primary is killed (SIGKILL): time until `/readyz` is 200 again on every
//! keygate, until a key created before the kill and never used on that keygate is
//! answered (a cache miss), and until a management write succeeds with
//! min_replicas_ack 1 (needs a replica again: the killed node is restarted once the
//! sentinels have promoted the replica, and they make it a replica) and 0.
//!
//! `--cluster`: a 6-node Redis Cluster (3 primaries, 3 replicas) and the same
//! propagation measurement; skipped with a message when `keygate serve` refuses
//! `store.redis.cluster`.
//!
//! Run: `cargo bench --bench propagation_ha [-- --cluster]` (needs `redis-server` and
//! `redis-cli`; N via KEYGATE_BENCH_N, default 1000). Prints p50/p99/max; the numbers go
//! into benches/RESULTS.md by hand.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "test and bench code: the request-path rules are for src/"
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = "bench-root-token-0123456789abcdef";
/// Bound on every wait of the failover measurement.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tiny blocking HTTP/1.1 request over std TCP (status 0 when nothing answers): the
/// bench measures keygate, not a client library.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    s.read_to_string(&mut out).ok();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `redis-cli -p PORT ARGS...` (raw output), empty when it fails.
fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--raw"])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Field `name` of `INFO`-style `name:value` lines.
fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}:")))
        .map(str::to_string)
}

/// Poll `check` every 20 ms until it holds, or panic with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn redis_server(dir: &Path, port: u16, extra: &[&str]) -> Kill {
    let data = dir.join(format!("redis-{port}"));
    std::fs::create_dir_all(&data).unwrap();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&data)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is required");
    let k = Kill(child);
    wait_until("redis-server up", Duration::from_secs(10), || {
        cli(port, &["ping"]).trim() == "PONG"
    });
    k
}

fn sentinel(dir: &Path, port: u16, primary: u16) -> Kill {
    // Sentinel rewrites its config file: one writable file per sentinel.
    let conf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor mymaster 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 3000\n",
            dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server --sentinel");
    let k = Kill(child);
    wait_until("sentinel up", Duration::from_secs(10), || {
        cli(port, &["ping"]).trim() == "PONG"
    });
    k
}

/// `SENTINEL MASTER mymaster` as field -> value.
fn sentinel_master(port: u16) -> std::collections::HashMap<String, String> {
    let out = cli(port, &["sentinel", "master", "mymaster"]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_string(), c[1].to_string()))
        .collect()
}

fn sentinel_primary_port(port: u16) -> Option<u16> {
    cli(port, &["sentinel", "get-master-addr-by-name", "mymaster"])
        .lines()
        .nth(1)
        .and_then(|p| p.trim().parse().ok())
}

struct Keygate {
    _child: Kill,
    name: String,
    proxy: String,
    admin: String,
    log: std::path::PathBuf,
}

/// Start keygate with `store` (a YAML flow mapping for `store.redis`); `Err` with its
/// log when it exits instead of becoming ready.
fn spawn_keygate(dir: &Path, name: &str, store: &str, upstream: u16) -> Result<Keygate, String> {
    let (p, a) = (free_port(), free_port());
    let cfg = format!(
        "proxy: {{ listen: \"127.0.0.1:{p}\", upstream: \"http://127.0.0.1:{upstream}\" }}\n\
         admin: {{ listen: \"127.0.0.1:{a}\" }}\n\
         store: {{ redis: {store} }}\n\
         routes:\n  - {{ name: any, path: \"/**\" }}\n"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, cfg).unwrap();
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("KEYGATE_ROOT_TOKEN", ROOT)
        .env("KEYGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start keygate");
    let admin = format!("127.0.0.1:{a}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("keygate {name} exited ({status}): {}", log.trim()));
        }
        if request(&admin, "GET", "/readyz", &[], "").0 == 200 {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("keygate {name} not ready in 30 s: {}", log.trim()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Keygate {
        _child: Kill(child),
        name: name.to_string(),
        proxy: format!("127.0.0.1:{p}"),
        admin,
        log: log_path,
    })
}

fn create_key(admin: &str, label: &str) -> (u16, String) {
    request(
        admin,
        "POST",
        "/v1/keys",
        &[
            ("Authorization", &format!("Bearer {ROOT}")),
            ("Content-Type", "application/json"),
        ],
        &format!("{{\"label\":\"{label}\"}}"),
    )
}

/// (id, key) of a new key, created through `admin`.
fn new_key(admin: &str, label: &str) -> (String, String) {
    let (status, body) = create_key(admin, label);
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

/// The proxy's status for a request with `key` (502 = passed authentication, no upstream).
fn use_key(proxy: &str, key: &str) -> u16 {
    request(
        proxy,
        "GET",
        "/x",
        &[("Authorization", &format!("Bearer {key}"))],
        "",
    )
    .0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(mut lags: Vec<Duration>) -> String {
    lags.sort();
    let pct = |p: f64| lags[((lags.len() as f64 * p).ceil() as usize).clamp(1, lags.len()) - 1];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(*lags.last().unwrap())
    )
}

/// Revoke `keys` on `a` one at a time; for each, the time from sending the DELETE until
/// each of `others` answers 403, and until the last of them does.
fn propagation(a: &Keygate, others: &[&Keygate], keys: &[(String, String)], what: &str) {
    // Warm the caches: every key authenticated once on every other keygate.
    for (_, key) in keys {
        for kg in others {
            let status = use_key(&kg.proxy, key);
            assert!(status == 502 || status == 200, "warm-up got {status}");
        }
    }
    let auth_root = format!("Bearer {ROOT}");
    let mut each = Vec::with_capacity(keys.len() * others.len());
    let mut all = Vec::with_capacity(keys.len());
    let mut delete = Vec::with_capacity(keys.len());
    for (i, (id, key)) in keys.iter().enumerate() {
        let t0 = Instant::now();
        let (status, body) = request(
            &a.admin,
            "DELETE",
            &format!("/v1/keys/{id}"),
            &[("Authorization", &auth_root)],
            "",
        );
        assert_eq!(status, 200, "{body}");
        delete.push(t0.elapsed());
        let mut pending: Vec<(&Keygate, u16)> = others.iter().map(|kg| (*kg, 0)).collect();
        while !pending.is_empty() {
            pending.retain_mut(|(kg, last)| {
                *last = use_key(&kg.proxy, key);
                if *last == 403 {
                    each.push(t0.elapsed());
                    false
                } else {
                    true
                }
            });
            if t0.elapsed() > Duration::from_secs(10) {
                let who: Vec<String> = pending
                    .iter()
                    .map(|(kg, last)| {
                        let log = std::fs::read_to_string(&kg.log).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(5).collect();
                        format!("keygate {} (answers {last}; log tail: {tail:?})", kg.name)
                    })
                    .collect();
                panic!(
                    "{what}: key {i} (of {}) revoked on A, still accepted after 10 s by {who:?}",
                    keys.len()
                );
            }
        }
        all.push(t0.elapsed());
    }
    let n = keys.len();
    println!(
        "{what}: revocation propagation A->B,C,D over {n} keys (DELETE sent on A until the keygate answers 403), each of the {} (keygate, key) pairs: {}",
        each.len(),
        summary(each)
    );
    println!("{what}:   until all three refuse: {}", summary(all));
    println!(
        "{what}:   the DELETE's own answer on A: {}",
        summary(delete)
    );
    std::io::stdout().flush().ok();
}

fn bench_n() -> usize {
    std::env::var("KEYGATE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn main() {
    // `cargo test --all-targets` runs benches in test mode with `--bench` absent: skip.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "propagation_ha bench: run with `cargo bench --bench propagation_ha [-- --cluster]`"
        );
        return;
    }
    if args.iter().any(|a| a == "--cluster") {
        cluster();
    } else {
        sentinel_bench();
    }
}

fn sentinel_bench() {
    let n = bench_n();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (primary_port, replica_port) = (free_port(), free_port());
    let mut primary = Some(redis_server(dir, primary_port, &[]));
    let _replica = redis_server(
        dir,
        replica_port,
        &["--replicaof", "127.0.0.1", &primary_port.to_string()],
    );
    wait_until("the replica in sync", Duration::from_secs(20), || {
        info_field(
            &cli(replica_port, &["info", "replication"]),
            "master_link_status",
        )
        .as_deref()
            == Some("up")
    });
    let sentinel_ports = [free_port(), free_port(), free_port()];
    let _sentinels: Vec<Kill> = sentinel_ports
        .iter()
        .map(|&p| sentinel(dir, p, primary_port))
        .collect();
    wait_until(
        "the sentinels know each other and the replica",
        Duration::from_secs(30),
        || {
            sentinel_ports.iter().all(|&p| {
                let m = sentinel_master(p);
                m.get("num-other-sentinels").map(String::as_str) == Some("2")
                    && m.get("num-slaves").map(String::as_str) == Some("1")
            })
        },
    );
    let nodes = sentinel_ports
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let store = |ack: u32| {
        format!(
            "{{ sentinel: {{ master_name: mymaster, nodes: [{nodes}] }}, namespace: bench, min_replicas_ack: {ack} }}"
        )
    };
    // No upstream: a request that passed authentication gets 502.
    let upstream = free_port();
    let fleet: Vec<Keygate> = ["a", "b", "c", "d"]
        .iter()
        .map(|name| spawn_keygate(dir, name, &store(1), upstream).unwrap())
        .collect();
    let ack0 = spawn_keygate(dir, "e-ack0", &store(0), upstream).unwrap();
    println!(
        "sentinel: primary 127.0.0.1:{primary_port}, replica 127.0.0.1:{replica_port}, sentinels {sentinel_ports:?}; 4 keygates min_replicas_ack 1, 1 keygate min_replicas_ack 0"
    );

    let keys: Vec<(String, String)> = (0..n)
        .map(|i| new_key(&fleet[0].admin, &format!("bench-{i}")))
        .collect();
    let others: Vec<&Keygate> = fleet[1..].iter().collect();
    propagation(&fleet[0], &others, &keys, "sentinel");

    // Failover. One key per keygate that it has never seen (a create evicts, it does not
    // fill the cache), created on A with min_replicas_ack 1, so the replica has it.
    let miss: Vec<String> = fleet
        .iter()
        .enumerate()
        .map(|(i, _)| new_key(&fleet[0].admin, &format!("miss-{i}")).1)
        .collect();
    let after: Vec<(String, String)> = (0..n.min(100))
        .map(|i| new_key(&fleet[0].admin, &format!("after-{i}")))
        .collect();
    let t0 = Instant::now();
    drop(primary.take()); // SIGKILL
    println!("sentinel: primary killed (SIGKILL)");
    let shared_fleet: Vec<(String, String)> = fleet
        .iter()
        .map(|k| (k.proxy.clone(), k.admin.clone()))
        .collect();
    let watch = std::thread::scope(|s| {
        // /readyz on every keygate: first 200 after it was seen not 200.
        let ready = s.spawn(|| {
            let mut admins: Vec<&str> = shared_fleet.iter().map(|k| k.1.as_str()).collect();
            admins.push(&ack0.admin);
            let mut down = vec![false; admins.len()];
            let mut back: Vec<Option<Duration>> = vec![None; admins.len()];
            while back.iter().any(Option::is_none) && t0.elapsed() < FAILOVER_DEADLINE {
                for (i, admin) in admins.iter().enumerate() {
                    if back[i].is_some() {
                        continue;
                    }
                    let ok = request(admin, "GET", "/readyz", &[], "").0 == 200;
                    if !ok {
                        down[i] = true;
                    } else if down[i] {
                        back[i] = Some(t0.elapsed());
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (down, back)
        });
        // A cache miss on every keygate of the fleet.
        let misses = s.spawn(|| {
            let mut done: Vec<Option<(Duration, u16)>> = vec![None; shared_fleet.len()];
            while done.iter().any(Option::is_none) && t0.elapsed() < FAILOVER_DEADLINE {
                for (i, (proxy, _)) in shared_fleet.iter().enumerate() {
                    if done[i].is_none() {
                        let status = use_key(proxy, &miss[i]);
                        if status != 503 && status != 0 {
                            done[i] = Some((t0.elapsed(), status));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            done
        });
        // Management writes: min_replicas_ack 1 (A) and 0 (E).
        let write = |admin: String| {
            move || {
                let mut failures = std::collections::BTreeMap::<u16, u32>::new();
                while t0.elapsed() < FAILOVER_DEADLINE {
                    let (status, _) = create_key(&admin, "during-failover");
                    if status == 201 {
                        return (Some(t0.elapsed()), failures);
                    }
                    *failures.entry(status).or_default() += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                (None, failures)
            }
        };
        let w1 = s.spawn(write(shared_fleet[0].1.clone()));
        let w0 = s.spawn(write(ack0.admin.clone()));

        // The sentinels promote the replica; then the killed node is restarted (as it
        // was: a primary with no data, and no replicaof) and they make it a replica.
        let mut promoted = None;
        while t0.elapsed() < FAILOVER_DEADLINE {
            if sentinel_ports
                .iter()
                .all(|&p| sentinel_primary_port(p) == Some(replica_port))
            {
                promoted = Some(t0.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let promoted = promoted.expect("the sentinels never promoted the replica");
        let restarted_node = redis_server(dir, primary_port, &[]);
        let restarted = t0.elapsed();
        let mut replica_again = None;
        while t0.elapsed() < FAILOVER_DEADLINE {
            let info = cli(primary_port, &["info", "replication"]);
            if info_field(&info, "role").as_deref() == Some("slave")
                && info_field(&info, "master_link_status").as_deref() == Some("up")
            {
                replica_again = Some(t0.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (
            promoted,
            restarted,
            replica_again,
            restarted_node,
            ready.join().unwrap(),
            misses.join().unwrap(),
            w1.join().unwrap(),
            w0.join().unwrap(),
        )
    });
    let (promoted, restarted, replica_again, _restarted_node, ready, misses, w1, w0) = watch;
    let s = |d: Option<Duration>| {
        d.map_or("never (90 s)".to_string(), |d| {
            format!("{:.2} s", d.as_secs_f64())
        })
    };
    println!("sentinel failover, all times from the SIGKILL:");
    println!(
        "  the three sentinels name the replica as primary: {}",
        s(Some(promoted))
    );
    let (down, back) = ready;
    for (i, name) in ["A", "B", "C", "D", "E (ack 0)"].iter().enumerate() {
        println!(
            "  keygate {name}: /readyz 200 again {}{}; cache miss answered {}",
            s(back[i]),
            if down[i] { "" } else { " (never seen unready)" },
            misses.get(i).map_or("-".to_string(), |m| m
                .map_or(s(None), |(d, st)| format!("{} (status {st})", s(Some(d)))))
        );
    }
    let all_ready = back
        .iter()
        .copied()
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().max().unwrap());
    let all_miss = misses
        .iter()
        .map(|m| m.map(|x| x.0))
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().max().unwrap());
    println!("  /readyz 200 on all keygates: {}", s(all_ready));
    println!("  a cache miss answered on all four: {}", s(all_miss));
    println!(
        "  killed node restarted at {}; a replica of the new primary (link up) at {} ({} after its restart)",
        s(Some(restarted)),
        s(replica_again),
        s(replica_again.map(|r| r.saturating_sub(restarted)))
    );
    println!(
        "  management write, min_replicas_ack 1: {} ({} after the restart); refused before: {:?}",
        s(w1.0),
        s(w1.0.map(|w| w.saturating_sub(restarted))),
        w1.1
    );
    println!(
        "  management write, min_replicas_ack 0: {}; refused before: {:?}",
        s(w0.0),
        w0.1
    );
    std::io::stdout().flush().ok();
    // The change feed follows the new primary: revocations still propagate.
    propagation(&fleet[0], &others, &after, "sentinel, after the failover");
}

fn cluster() {
    let n = bench_n();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let _nodes: Vec<Kill> = ports
        .iter()
        .map(|&p| {
            let conf = format!("nodes-{p}.conf");
            redis_server(
                dir,
                p,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
        })
        .collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .expect("redis-cli");
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_until(
        "cluster_state:ok on every node",
        Duration::from_secs(30),
        || {
            ports.iter().all(|&p| {
                info_field(&cli(p, &["cluster", "info"]), "cluster_state").as_deref() == Some("ok")
            })
        },
    );
    // cluster_state:ok comes before the replicas are in sync; writes WAIT for them.
    wait_until(
        "every primary with an online replica",
        Duration::from_secs(30),
        || {
            ports.iter().all(|&p| {
                let info = cli(p, &["info", "replication"]);
                match info_field(&info, "role").as_deref() {
                    Some("master") => {
                        info_field(&info, "slave0").is_some_and(|s| s.contains("state=online"))
                    }
                    Some("slave") => {
                        info_field(&info, "master_link_status").as_deref() == Some("up")
                    }
                    _ => false,
                }
            })
        },
    );
    let nodes = ports
        .iter()
        .map(|p| format!("\"redis://127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let store =
        format!("{{ cluster: {{ nodes: [{nodes}] }}, namespace: bench, min_replicas_ack: 1 }}");
    let upstream = free_port();
    let first = match spawn_keygate(dir, "a", &store, upstream) {
        Ok(kg) => kg,
        Err(e) if e.contains("store.redis.cluster") => {
            println!("cluster: SKIPPED: this keygate refuses store.redis.cluster ({e})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut fleet = vec![first];
    for name in ["b", "c", "d"] {
        fleet.push(spawn_keygate(dir, name, &store, upstream).unwrap());
    }
    println!("cluster: 6 nodes {ports:?} (3 primaries, 3 replicas); 4 keygates min_replicas_ack 1");
    let keys: Vec<(String, String)> = (0..n)
        .map(|i| new_key(&fleet[0].admin, &format!("bench-{i}")))
        .collect();
    let others: Vec<&Keygate> = fleet[1..].iter().collect();
    propagation(&fleet[0], &others, &keys, "cluster");
}
