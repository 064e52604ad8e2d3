//! High-availability harness: `SentinelSet` (one primary, N replicas and three Redis
//! Sentinels, each a private `redis-server` on a free port in a temp dir, SIGKILLed on
//! drop) and `Keygate` (the keygate binary as a child process on free ports, with its
//! stderr in a file).
#![allow(dead_code)]

use crate::support::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The name every sentinel monitors the primary under.
pub const MASTER_NAME: &str = "mymaster";

/// How long the harness waits for Redis or the sentinels to converge before failing.
const CONVERGE: Duration = Duration::from_secs(30);

fn redis_server_bin() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/bin",
        "/usr/local/bin",
        "/usr/sbin",
    ]) {
        let p = PathBuf::from(dir).join("redis-server");
        if p.exists() {
            return p;
        }
    }
    panic!("redis-server is not installed: run scripts/test (it installs it) or apt-get install redis-server");
}

/// A connection to `127.0.0.1:port` (a data node or a sentinel), 2 s to connect.
pub fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(c)
}

/// Run one command on `127.0.0.1:port`.
pub fn cmd_on<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> redis::RedisResult<T> {
    let mut c = connect(port)?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut c)
}

/// `field:value` from an `INFO` reply.
pub fn info_field(info: &str, field: &str) -> Option<String> {
    let prefix = format!("{field}:");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// Poll `check` every 50 ms until it gives `Some` or `within` passes (then panic with
/// `what` and the last error the check reported).
fn converge<T>(within: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(t) => return t,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what} within {within:?}: last state: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A `SENTINEL replicas` / `SENTINEL sentinels` entry: a flat field/value list.
fn entry_field(entry: &[String], field: &str) -> Option<String> {
    entry
        .chunks(2)
        .find(|kv| kv.len() == 2 && kv[0] == field)
        .map(|kv| kv[1].clone())
}

/// One redis-server process (data node or sentinel) with its own port and temp dir.
struct Node {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn new() -> Node {
        Node {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// Start a data node, a replica of `replica_of` when given. Returns once it answers PING.
    fn launch_data(&mut self, replica_of: Option<u16>) {
        assert!(self.child.is_none(), "node {} already running", self.port);
        let mut cmd = Command::new(redis_server_bin());
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // Full syncs at once: Redis 7 waits 5 s for more replicas by default.
            .args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .args(["--repl-ping-replica-period", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &p.to_string()]);
        }
        self.child = Some(cmd.spawn().expect("start redis-server"));
        self.wait_ping();
    }

    /// Start a sentinel monitoring `primary`. Its config file is rewritten by the sentinel,
    /// so it lives (writable) in the node's temp dir.
    fn launch_sentinel(&mut self, primary: u16) {
        assert!(
            self.child.is_none(),
            "sentinel {} already running",
            self.port
        );
        let conf = self.dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\n\
                 bind 127.0.0.1\n\
                 daemonize no\n\
                 dir {dir}\n\
                 logfile {log}\n\
                 sentinel resolve-hostnames no\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 3000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                port = self.port,
                dir = self.dir.path().display(),
                log = self.log_path().display(),
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new(redis_server_bin())
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        self.child = Some(child);
        self.wait_ping();
    }

    fn wait_ping(&self) {
        let port = self.port;
        converge(
            Duration::from_secs(10),
            &format!("redis-server on {port} answers PING"),
            || {
                cmd_on::<String>(port, &["PING"])
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
        );
    }

    /// SIGKILL (a crash, not a shutdown).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last `lines` lines of its log file.
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One primary, `n` replicas (`--replicaof`) and three sentinels monitoring them as
/// `mymaster` (quorum 2, down-after 1000 ms, failover-timeout 3000 ms). Everything is
/// SIGKILLed on drop; on a panicking test the sentinels' and nodes' log tails are printed.
pub struct SentinelSet {
    data: Vec<Node>,
    sentinels: Vec<Node>,
    /// Index in `data` of the node the harness last saw as primary.
    primary: usize,
    /// Index in `data` of the node `kill_primary` killed (for `restart_old_primary_as_replica`).
    killed_primary: Option<usize>,
    /// Index in `data` of the node `stop_replica` stopped.
    stopped_replica: Option<usize>,
}

impl SentinelSet {
    /// One primary, one replica, three sentinels.
    pub fn start() -> SentinelSet {
        Self::start_with_replicas(1)
    }

    /// One primary, `replicas` replicas, three sentinels; returns once every sentinel
    /// knows the primary, every replica and the two other sentinels, and every replica
    /// is in sync.
    pub fn start_with_replicas(replicas: usize) -> SentinelSet {
        let started = Instant::now();
        let mut set = SentinelSet {
            data: (0..=replicas).map(|_| Node::new()).collect(),
            sentinels: (0..3).map(|_| Node::new()).collect(),
            primary: 0,
            killed_primary: None,
            stopped_replica: None,
        };
        set.data[0].launch_data(None);
        let primary = set.data[0].port;
        for node in &mut set.data[1..] {
            node.launch_data(Some(primary));
        }
        set.wait_replicas_synced();
        for s in &mut set.sentinels {
            s.launch_sentinel(primary);
        }
        set.wait_sentinels_agree();
        eprintln!(
            "sentinel set: primary {primary}, replicas {:?}, sentinels {:?}, up in {:?}",
            set.replica_ports(),
            set.sentinel_ports(),
            started.elapsed()
        );
        set
    }

    /// `127.0.0.1:PORT` of each sentinel (for `store.redis.sentinel.nodes`).
    pub fn sentinel_nodes(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// `sentinel_nodes` as a YAML flow list: `["127.0.0.1:1", ...]`.
    pub fn sentinel_nodes_yaml(&self) -> String {
        let quoted: Vec<String> = self
            .sentinel_nodes()
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect();
        format!("[{}]", quoted.join(", "))
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The port of the node the harness last saw as primary (updated by `wait_failover`).
    pub fn primary_port(&self) -> u16 {
        self.data[self.primary].port
    }

    /// Ports of the replicas that are running.
    pub fn replica_ports(&self) -> Vec<u16> {
        self.replica_indices()
            .into_iter()
            .map(|i| self.data[i].port)
            .collect()
    }

    fn replica_indices(&self) -> Vec<usize> {
        (0..self.data.len())
            .filter(|&i| i != self.primary && self.data[i].alive())
            .collect()
    }

    /// Run one command on the current primary.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        cmd_on(self.primary_port(), args).expect("command on the primary")
    }

    /// Run one command on the first sentinel that answers.
    pub fn sentinel_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut last = None;
        for s in self.sentinels.iter().filter(|s| s.alive()) {
            match cmd_on(s.port, args) {
                Ok(v) => return v,
                Err(e) => last = Some(e),
            }
        }
        panic!("no sentinel answered {args:?}: {last:?}")
    }

    /// Times `command` (lowercase, e.g. "hgetall") ran on the current primary since the
    /// last `reset_stats`.
    pub fn calls(&self, command: &str) -> u64 {
        let info: String = self.cmd(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    pub fn reset_stats(&self) {
        let _: String = self.cmd(&["CONFIG", "RESETSTAT"]);
    }

    /// The primary's address as sentinel `port` reports it.
    pub fn primary_seen_by(port: u16) -> redis::RedisResult<(String, u16)> {
        let (host, p): (String, String) =
            cmd_on(port, &["SENTINEL", "get-master-addr-by-name", MASTER_NAME])?;
        Ok((host, p.parse().unwrap_or(0)))
    }

    /// Until every running replica says `master_link_status:up` towards the current
    /// primary and the primary counts them all as connected and online.
    pub fn wait_replicas_synced(&self) {
        let primary = self.primary_port();
        let replicas = self.replica_ports();
        converge(CONVERGE, "replicas in sync with the primary", || {
            for &r in &replicas {
                let info: String =
                    cmd_on(r, &["INFO", "replication"]).map_err(|e| format!("{r}: {e}"))?;
                let master = info_field(&info, "master_port");
                let link = info_field(&info, "master_link_status");
                if master.as_deref() != Some(&primary.to_string()) || link.as_deref() != Some("up")
                {
                    return Err(format!(
                        "replica {r}: master_port {master:?}, link {link:?}"
                    ));
                }
            }
            let info: String = cmd_on(primary, &["INFO", "replication"])
                .map_err(|e| format!("primary {primary}: {e}"))?;
            let online = info
                .lines()
                .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                .count();
            if info_field(&info, "role").as_deref() != Some("master") || online != replicas.len() {
                return Err(format!("primary {primary}: {info}"));
            }
            Ok(())
        });
    }

    /// Until every running sentinel names one primary, lists every other running data node
    /// as its replica (not down) and knows the other running sentinels. The sentinels may
    /// have failed over once more meanwhile (a new primary slow to answer on a loaded
    /// machine is seen down after `down-after-milliseconds`): the primary they agree on,
    /// if it says `role:master`, becomes the harness's.
    pub fn wait_sentinels_agree(&mut self) {
        let sentinels: Vec<u16> = self
            .sentinels
            .iter()
            .filter(|s| s.alive())
            .map(|s| s.port)
            .collect();
        let agreed = converge(CONVERGE, "sentinels agree on the topology", || {
            let primary = self.primary_agreed(&sentinels)?;
            let replicas: Vec<u16> = (self.data.iter())
                .filter(|n| n.alive() && n.port != primary)
                .map(|n| n.port)
                .collect();
            for &s in &sentinels {
                let err = |e: redis::RedisError| format!("sentinel {s}: {e}");
                let (_, p) = Self::primary_seen_by(s).map_err(err)?;
                if p != primary {
                    return Err(format!("sentinel {s} names primary {p}, not {primary}"));
                }
                let known: Vec<Vec<String>> =
                    cmd_on(s, &["SENTINEL", "replicas", MASTER_NAME]).map_err(err)?;
                for &r in &replicas {
                    let ok = known.iter().any(|e| {
                        entry_field(e, "port").as_deref() == Some(&r.to_string())
                            && entry_field(e, "flags").is_some_and(|f| {
                                f == "slave" || (!f.contains("down") && !f.contains("disconnected"))
                            })
                            && entry_field(e, "master-port").as_deref()
                                == Some(&primary.to_string())
                    });
                    if !ok {
                        return Err(format!("sentinel {s} does not list replica {r}: {known:?}"));
                    }
                }
                let peers: Vec<Vec<String>> =
                    cmd_on(s, &["SENTINEL", "sentinels", MASTER_NAME]).map_err(err)?;
                let peers_up = peers
                    .iter()
                    .filter(|e| {
                        entry_field(e, "flags").is_some_and(|f| !f.contains("down"))
                            && entry_field(e, "port")
                                .and_then(|p| p.parse::<u16>().ok())
                                .is_some_and(|p| sentinels.contains(&p))
                    })
                    .count();
                if peers_up != sentinels.len() - 1 {
                    return Err(format!("sentinel {s} knows sentinels {peers:?}"));
                }
            }
            Ok(primary)
        });
        if agreed != self.primary_port() {
            eprintln!(
                "the sentinels failed over again: primary {} -> {agreed}",
                self.primary_port()
            );
            self.primary = (self.data.iter())
                .position(|n| n.port == agreed)
                .expect("a node of the set");
        }
    }

    /// The primary every sentinel in `sentinels` names, when they agree and it is a running
    /// node of the set that says `role:master`.
    fn primary_agreed(&self, sentinels: &[u16]) -> Result<u16, String> {
        let mut named = None;
        for &s in sentinels {
            let (_, p) = Self::primary_seen_by(s).map_err(|e| format!("sentinel {s}: {e}"))?;
            if named.is_some_and(|n| n != p) {
                return Err(format!("sentinel {s} names primary {p}, others {named:?}"));
            }
            named = Some(p);
        }
        let p = named.ok_or("no sentinel running")?;
        if !self.data.iter().any(|n| n.port == p && n.alive()) {
            return Err(format!("the sentinels name {p}, which is not running"));
        }
        let role: Vec<redis::Value> =
            cmd_on(p, &["ROLE"]).map_err(|e| format!("ROLE on {p}: {e}"))?;
        match role.first() {
            Some(redis::Value::BulkString(b)) if b == b"master" => Ok(p),
            other => Err(format!("{p} has role {other:?}")),
        }
    }

    /// SIGKILL the primary.
    pub fn kill_primary(&mut self) {
        let i = self.primary;
        self.data[i].kill();
        self.killed_primary = Some(i);
        eprintln!("killed primary {}", self.data[i].port);
    }

    /// Until every running sentinel names a node other than the one the harness last saw as
    /// primary, and that node says `role:master`; then that node is the harness's primary.
    /// Returns its port.
    pub fn wait_failover(&mut self) -> u16 {
        self.wait_failover_within(CONVERGE)
    }

    pub fn wait_failover_within(&mut self, within: Duration) -> u16 {
        let old = self.primary_port();
        let sentinels: Vec<u16> = self
            .sentinels
            .iter()
            .filter(|s| s.alive())
            .map(|s| s.port)
            .collect();
        let new = converge(within, "failover to a new primary", || {
            match self.primary_agreed(&sentinels)? {
                p if p == old => Err(format!("the sentinels still name {old}")),
                p => Ok(p),
            }
        });
        self.primary = self
            .data
            .iter()
            .position(|n| n.port == new)
            .unwrap_or_else(|| panic!("sentinels name {new}, which is none of the set's nodes"));
        eprintln!("failover: primary {old} -> {new}");
        new
    }

    /// `SENTINEL FAILOVER mymaster` on the first sentinel: a graceful failover, the old
    /// primary stays up and is turned into a replica of the new one (it answers writes
    /// with READONLY). Follow with `wait_failover`.
    pub fn manual_failover(&self) {
        let ok: String = cmd_on(
            self.sentinels[0].port,
            &["SENTINEL", "FAILOVER", MASTER_NAME],
        )
        .expect("SENTINEL FAILOVER");
        assert_eq!(ok, "OK");
    }

    /// `REPLICAOF` the current primary on the running node `port` (what the sentinels do
    /// to a demoted primary at their next `INFO` of it, up to 10 s later), then wait until
    /// every replica is in sync.
    pub fn make_replica(&self, port: u16) {
        let primary = self.primary_port().to_string();
        let ok: String = cmd_on(port, &["REPLICAOF", "127.0.0.1", &primary]).expect("REPLICAOF");
        assert_eq!(ok, "OK");
        self.wait_replicas_synced();
    }

    /// Start the node `kill_primary` killed again (empty: no persistence) as a replica of
    /// the current primary, and wait until it is in sync.
    pub fn restart_old_primary_as_replica(&mut self) {
        let i = self.killed_primary.take().expect("kill_primary first");
        let primary = self.primary_port();
        self.data[i].launch_data(Some(primary));
        self.wait_replicas_synced();
    }

    /// SIGKILL the first running replica.
    pub fn stop_replica(&mut self) -> u16 {
        let i = *self.replica_indices().first().expect("a running replica");
        self.data[i].kill();
        self.stopped_replica = Some(i);
        let port = self.data[i].port;
        let primary = self.primary_port();
        // The primary notices the closed link at once; wait until it counts no such replica.
        converge(CONVERGE, "the primary forgets the stopped replica", || {
            let info: String =
                cmd_on(primary, &["INFO", "replication"]).map_err(|e| e.to_string())?;
            if info.contains(&format!("port={port},")) {
                Err(info)
            } else {
                Ok(())
            }
        });
        port
    }

    /// Start the replica `stop_replica` stopped again (a replica of the current primary)
    /// and wait until it is in sync.
    pub fn start_replica(&mut self) {
        let i = self.stopped_replica.take().expect("stop_replica first");
        let primary = self.primary_port();
        self.data[i].launch_data(Some(primary));
        self.wait_replicas_synced();
    }

    /// SIGKILL every running replica.
    pub fn kill_replicas(&mut self) {
        for i in self.replica_indices() {
            self.data[i].kill();
        }
    }

    /// Start the killed primary again on its port as a primary (empty), without failover.
    pub fn restart_primary(&mut self) {
        let i = self.killed_primary.take().expect("kill_primary first");
        self.data[i].launch_data(None);
    }

    /// The last lines of every node's and sentinel's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (kind, nodes) in [("data", &self.data), ("sentinel", &self.sentinels)] {
            for n in nodes.iter() {
                out.push_str(&format!(
                    "--- {kind} {} ---\n{}\n",
                    n.port,
                    n.log_tail(lines)
                ));
            }
        }
        out
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(15));
        }
    }
}

/// The keygate binary as a child process (`serve --config FILE`), killed on drop.
pub struct Keygate {
    pub proxy: String,
    pub admin: String,
    pub log_path: PathBuf,
    pub child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Keygate {
    /// Write `config` (with `{proxy_port}` and `{admin_port}` filled in with free ports) to
    /// a temp dir and start `keygate serve --config` on it with the root token
    /// `support::ROOT`, stderr to `log_path`. Does not wait for readiness.
    pub fn spawn(config: &str) -> Keygate {
        let dir = tempfile::tempdir().expect("temp dir");
        let (proxy_port, admin_port) = (free_port(), free_port());
        let text = config
            .replace("{proxy_port}", &proxy_port.to_string())
            .replace("{admin_port}", &admin_port.to_string());
        let path = dir.path().join("keygate.yaml");
        std::fs::write(&path, text).expect("write keygate.yaml");
        let log_path = dir.path().join("stderr.log");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEYGATE_")) {
            cmd.env_remove(k);
        }
        let child = cmd
            .args(["serve", "--config"])
            .arg(&path)
            .env("KEYGATE_ROOT_TOKEN", crate::support::ROOT)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).expect("create log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start keygate");
        Keygate {
            proxy: format!("http://127.0.0.1:{proxy_port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            log_path,
            child,
            _dir: dir,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (up to 20 s) for /readyz to answer 200, or fails the test with the logs (at
    /// once if the process exits, e.g. refusing its config).
    pub async fn wait_ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http
                .get(format!("{}/readyz", self.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return;
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                panic!(
                    "keygate did not become ready at {} (exited: {exited:?}); logs:\n{}",
                    self.admin,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Still the process started (never exited, so never restarted)?
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then up to 15 s for the process to exit.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let _ = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await;
        }
    }
}

/// Path helper for tests that want their own files beside a harness.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write file");
    path
}

/// A proof of the harness on its own: the sentinels see a SIGKILLed primary replaced by its
/// replica, which takes writes; the old primary comes back as a replica of it.
#[test]
fn sentinel_harness_fails_over_a_killed_primary() {
    let mut set = SentinelSet::start();
    let old = set.primary_port();
    let _: () = set.cmd(&["SET", "harness:k", "v"]);
    let acked: i64 = set.cmd(&["WAIT", "1", "1000"]);
    assert_eq!(acked, 1, "the replica did not acknowledge the write");
    assert_eq!(set.sentinel_nodes().len(), 3);

    let started = Instant::now();
    set.kill_primary();
    let new = set.wait_failover();
    eprintln!("harness failover took {:?}", started.elapsed());
    assert_ne!(new, old);
    assert_eq!(set.primary_port(), new);
    let v: String = set.cmd(&["GET", "harness:k"]);
    assert_eq!(
        v, "v",
        "the acknowledged write did not survive the failover"
    );
    let _: () = set.cmd(&["SET", "harness:k2", "after"]);

    set.restart_old_primary_as_replica();
    assert_eq!(set.replica_ports(), vec![old]);
    let acked: i64 = set.cmd(&["WAIT", "1", "1000"]);
    assert_eq!(acked, 1, "the old primary does not replicate the new one");
    let v: String = cmd_on(old, &["GET", "harness:k2"]).unwrap();
    assert_eq!(v, "after");
    assert!(set.calls("set") >= 1);

    // A stopped replica makes WAIT time out; a restarted one syncs again.
    set.stop_replica();
    let acked: i64 = set.cmd(&["WAIT", "1", "200"]);
    assert_eq!(acked, 0);
    set.start_replica();
    let acked: i64 = set.cmd(&["WAIT", "1", "1000"]);
    assert_eq!(acked, 1);
}

/// With two replicas, the one not promoted follows the new primary by itself (the
/// sentinels reconfigure it), so writes can be confirmed again without an operator.
#[test]
fn sentinel_harness_second_replica_follows_the_new_primary() {
    let mut set = SentinelSet::start_with_replicas(2);
    let _: () = set.cmd(&["SET", "harness:k", "v"]);
    let acked: i64 = set.cmd(&["WAIT", "2", "1000"]);
    assert_eq!(acked, 2);
    let started = Instant::now();
    set.kill_primary();
    set.wait_failover();
    let failover = started.elapsed();
    set.wait_replicas_synced();
    eprintln!(
        "failover {failover:?}, other replica in sync {:?}",
        started.elapsed()
    );
    assert_eq!(set.replica_ports().len(), 1);
    let acked: i64 = set.cmd(&["WAIT", "1", "1000"]);
    assert_eq!(acked, 1);
    set.wait_sentinels_agree();
}
