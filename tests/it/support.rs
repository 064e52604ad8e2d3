//! Test harness: `Redis` (a private redis-server on a free port in a temp dir, stoppable
//! and restartable), `spawn_app` (keygate in-process on port 0 with the echo upstream),
//! `eventually` (poll with a deadline instead of sleeping).
#![allow(dead_code)]

use keygate::app::ShutdownHandle;
use keygate::config::Config;
use keygate::App;
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ROOT: &str = "test-root-token-0123456789abcdef";

/// A port nothing listens on now, and never one this test process handed out before: the
/// kernel may give the same ephemeral port to two binds in a row once the first is closed,
/// and a config with the same port for proxy and admin is (rightly) refused.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind an ephemeral port")
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Whether `promtool` (Debian package `prometheus`) runs here. Without it the promtool
/// checks are skipped, unless `KEYGATE_REQUIRE_PROMTOOL` is set (scripts/test sets it
/// after installing promtool, so CI cannot pass them quietly): then its absence fails.
pub fn promtool_available() -> bool {
    let runs = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        runs || std::env::var_os("KEYGATE_REQUIRE_PROMTOOL").is_none(),
        "KEYGATE_REQUIRE_PROMTOOL is set but promtool does not run: apt-get install prometheus"
    );
    runs
}

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

/// A private redis-server. Killed on drop.
pub struct Redis {
    pub port: u16,
    pub url: String,
    dir: tempfile::TempDir,
    persistent: bool,
    child: Option<Child>,
}

impl Redis {
    /// No persistence.
    pub fn start() -> Redis {
        Self::start_with(false)
    }

    /// AOF with fsync on every write, so a SIGKILL loses nothing acknowledged.
    pub fn start_persistent() -> Redis {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Redis {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut r = Redis {
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
            dir,
            persistent,
            child: None,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let mut cmd = Command::new(redis_server_bin());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        self.child = Some(cmd.spawn().expect("start redis-server"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.conn() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url.as_str())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// Run one command and return its reply.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = self.conn().expect("connect to test redis");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c).expect("redis command")
    }

    /// Kill with SIGKILL (a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port and directory (persistent data is reloaded).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Times `command` (lowercase, e.g. "hgetall") ran since the last `reset_stats`.
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
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running keygate with its echo upstream.
pub struct TestApp {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: SocketAddr,
    pub http: reqwest::Client,
    shutdown: ShutdownHandle,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A config for tests. `{upstream}` and `{store}` are filled in by `spawn_app`.
pub const TEST_CONFIG: &str = r#"
proxy:
  listen: 127.0.0.1:0
  upstream: {upstream}
  timeouts: { upstream: 2s, header_read: 2s, idle: 30s }
admin:
  listen: 127.0.0.1:0
store:
  {store}
  last_used_interval: 200ms
cache: { ttl: 5m, negative_ttl: 2s }
routes:
  - { name: health, path: /healthz, auth: none }
  - { name: public, path: "/public/**", auth: none }
  - { name: users-read, methods: [GET, HEAD], path: "/users/**", scopes: ["users:read"] }
  - { name: users-write, methods: [POST, PUT, PATCH, DELETE], path: "/users/**", scopes: ["users:write"] }
  - { name: admin-area, path: "/admin/**", scopes: ["admin"] }
  - { name: widgets, path: "/widgets/**", allow_publishable: true }
  - { name: uploads, methods: [POST, PUT], path: "/upload/**", scopes: ["files:write"] }
  - { name: small, methods: [POST], path: "/small/**", max_body_bytes: 1024 }
  - { name: slow, path: "/__sleep", auth: none }
  - { name: bytes, path: "/__bytes", scopes: ["files:read"] }
  - { name: ws, path: "/ws/**" }
unmatched: deny
"#;

/// Where keys live in a test app.
pub enum Store<'a> {
    Memory,
    /// Redis with a 1 s call timeout: CI machines are loaded and the crash test runs Redis
    /// with `appendfsync always`, so 250 ms is too tight for tests that are not about timeouts.
    Redis(&'a Redis),
    /// Redis with the given call timeout (for the tests that are about timeouts).
    RedisTimeout(&'a Redis, &'static str),
    /// A Redis Cluster (`support_cluster`), writes confirmed by one replica.
    Cluster(&'a crate::support_cluster::Cluster),
}

impl Store<'_> {
    fn yaml(&self) -> String {
        match self {
            Store::Memory => "memory: {}".into(),
            Store::Redis(r) => Store::RedisTimeout(r, "1s").yaml(),
            Store::RedisTimeout(r, timeout) => format!(
                "redis: {{ url: \"{}\", namespace: kgtest, timeout: {timeout} }}",
                r.url
            ),
            Store::Cluster(c) => format!(
                "redis: {{ cluster: {{ nodes: {:?} }}, namespace: kgtest, timeout: 1s }}",
                c.seeds()
            ),
        }
    }
}

/// Start keygate in-process with `config` (see `TEST_CONFIG`), an echo upstream
/// (unless the config names one already) and the root token `ROOT`.
pub async fn spawn_app_with(config: &str, store: Store<'_>) -> TestApp {
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .expect("start echo upstream");
    spawn_app_upstream(config, store, upstream).await
}

/// Like `spawn_app_with`, with an upstream of the test's own (e.g. a WebSocket server,
/// or a closed port for 502).
pub async fn spawn_app_upstream(config: &str, store: Store<'_>, upstream: SocketAddr) -> TestApp {
    spawn_app_env(config, store, upstream, &[]).await
}

/// Like `spawn_app_upstream`, with more environment variables (e.g. `KEYGATE_PEPPER`).
pub async fn spawn_app_env(
    config: &str,
    store: Store<'_>,
    upstream: SocketAddr,
    env: &[(&str, &str)],
) -> TestApp {
    let text = config
        .replace("{upstream}", &format!("http://{upstream}"))
        .replace("{store}", &store.yaml());
    let mut env = env.to_vec();
    env.push(("KEYGATE_ROOT_TOKEN", ROOT));
    let config = Config::from_yaml(&text, "test config", &env.as_slice())
        .unwrap_or_else(|e| panic!("test config: {e}"));
    let app = App::build(config).await.expect("build app");
    let (proxy, admin) = (app.proxy_addr, app.admin_addr);
    let shutdown = app.shutdown_handle();
    let task = tokio::spawn(app.run_until_stopped());
    TestApp {
        proxy,
        admin,
        upstream,
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("http client"),
        shutdown,
        task: Some(task),
    }
}

pub async fn spawn_app(store: Store<'_>) -> TestApp {
    spawn_app_with(TEST_CONFIG, store).await
}

/// A key as the admin API returned it.
#[derive(Debug, Clone)]
pub struct Key {
    pub id: String,
    pub key: String,
    pub body: Value,
}

impl TestApp {
    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Does `/readyz` answer 200 within 10 s?
    pub async fn becomes_ready(&self) -> bool {
        eventually(Duration::from_secs(10), || async {
            self.http
                .get(self.admin_url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await
    }

    /// Create a key through `POST /v1/keys` with the root token (tenant `default`
    /// unless `tenant` is given).
    pub async fn create_key_in(&self, tenant: Option<&str>, scopes: &[&str]) -> Key {
        let mut req = self
            .http
            .post(self.admin_url("/v1/keys"))
            .bearer_auth(ROOT)
            .json(&json!({"label": "test", "scopes": scopes}));
        if let Some(t) = tenant {
            req = req.header("X-Tenant-ID", t);
        }
        let resp = req.send().await.expect("admin reachable");
        assert_eq!(resp.status(), 201, "create key");
        let body: Value = resp.json().await.unwrap();
        Key {
            id: body["id"].as_str().unwrap().to_string(),
            key: body["key"].as_str().unwrap().to_string(),
            body,
        }
    }

    pub async fn create_key(&self, scopes: &[&str]) -> Key {
        self.create_key_in(None, scopes).await
    }

    /// GET through the proxy with a bearer key.
    pub async fn get_with(&self, path: &str, key: &str) -> reqwest::Response {
        self.http
            .get(self.proxy_url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("proxy reachable")
    }

    pub async fn revoke(&self, id: &str) -> reqwest::Response {
        self.http
            .delete(self.admin_url(&format!("/v1/keys/{id}")))
            .bearer_auth(ROOT)
            .send()
            .await
            .expect("admin reachable")
    }

    pub async fn stop(mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.shutdown();
    }
}

/// Poll `check` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Assert a keygate JSON error: status and stable code.
pub async fn assert_error(
    resp: reqwest::Response,
    status: u16,
    code: &str,
) -> reqwest::header::HeaderMap {
    let got = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "status for {code}: body {body}");
    assert_eq!(body["error"]["code"], code, "body {body}");
    assert!(body["error"]["message"].is_string(), "body {body}");
    headers
}
