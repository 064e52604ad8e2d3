//! The secret-scanning listener over real sockets: a report signed with a P-256 key made
//! here (its PEM in the config) revokes a live key on every replica (two keygate
//! processes on one Redis; both proxies then refuse it), labels a token that is not
//! keygate's `false_positive`; a tampered body, an unknown key identifier, a missing or
//! malformed signature are 401 and revoke nothing; hostile bodies are refused cleanly;
//! `action: report` revokes nothing and writes the audit event; `secret_scanning.tls`
//! serves HTTPS; the README's regular expression for scanners matches the key format.

use crate::support::{
    assert_error, eventually, free_port, spawn_app_with, Redis, Store, TestApp, ROOT, TEST_CONFIG,
};
use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A route that needs `users:read`.
const PATH: &str = "/users/1";
const URL: &str = "https://github.com/acme/app/blob/0123abc/config/settings.py";
const SOURCE: &str = "content";

/// A scanner's signing key, made here; its public half goes into the config.
struct ScannerKey {
    identifier: &'static str,
    key: SigningKey,
}

impl ScannerKey {
    fn new(identifier: &'static str) -> ScannerKey {
        loop {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).expect("os rng");
            if let Ok(key) = SigningKey::from_slice(&seed) {
                return ScannerKey { identifier, key };
            }
        }
    }

    fn pem(&self) -> String {
        (self.key.verifying_key())
            .to_public_key_pem(LineEnding::LF)
            .expect("PEM")
    }

    /// The base64 DER signature of `body`, as GitHub sends it.
    fn sign(&self, body: &[u8]) -> String {
        let signature: Signature = self.key.sign(body);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }
}

/// The `secret_scanning` section: listen on `port`, trust `keys`.
fn section(port: impl std::fmt::Display, action: &str, keys: &[&ScannerKey]) -> String {
    let mut s = format!(
        "secret_scanning:\n  listen: 127.0.0.1:{port}\n  action: {action}\n  public_keys:\n"
    );
    for k in keys {
        s.push_str(&format!(
            "    - key_identifier: {}\n      pem: |\n",
            k.identifier
        ));
        for line in k.pem().lines() {
            s.push_str(&format!("        {line}\n"));
        }
    }
    s
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// POST `body` to the listener at `addr` with the given identifier and signature headers.
async fn post(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    identifier: Option<&str>,
    signature: Option<&str>,
) -> reqwest::Response {
    let mut req = client()
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(id) = identifier {
        req = req.header("GITHUB-PUBLIC-KEY-IDENTIFIER", id);
    }
    if let Some(sig) = signature {
        req = req.header("GITHUB-PUBLIC-KEY-SIGNATURE", sig);
    }
    req.send()
        .await
        .expect("secret-scanning listener reachable")
}

/// A correctly signed report of `tokens` to `/v1/secret-scanning`.
async fn report(addr: SocketAddr, key: &ScannerKey, tokens: &[&str]) -> reqwest::Response {
    let body = body(tokens);
    post(
        addr,
        "/v1/secret-scanning",
        &body,
        Some(key.identifier),
        Some(&key.sign(&body)),
    )
    .await
}

fn body(tokens: &[&str]) -> Vec<u8> {
    let items: Vec<Value> = tokens
        .iter()
        .map(|t| json!({"token": t, "type": "keygate_api_key", "url": URL, "source": SOURCE}))
        .collect();
    serde_json::to_vec(&items).unwrap()
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The labels of a 200 answer, in order, each checked against its token's hash.
async fn labels(resp: reqwest::Response, tokens: &[&str]) -> Vec<String> {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "report answer: {body}");
    let items = body.as_array().expect("an array");
    assert_eq!(items.len(), tokens.len(), "{body}");
    items
        .iter()
        .zip(tokens)
        .map(|(item, token)| {
            assert_eq!(item["token_hash"], sha256_hex(token), "{body}");
            assert_eq!(item["token_type"], "keygate_api_key", "{body}");
            item["label"].as_str().expect("a label").to_string()
        })
        .collect()
}

/// A well-formed key that no store has heard of.
fn unknown_key() -> String {
    use keygate::key::{self, Environment, KeyType, Prefixes};
    key::generate(&Prefixes::default(), KeyType::Secret, Environment::Live)
        .expect("os rng")
        .text
}

/// One keygate's proxy, admin and secret-scanning ports.
struct Node {
    proxy: SocketAddr,
    admin: SocketAddr,
    scanning: SocketAddr,
}

impl Node {
    fn of(app: &TestApp, scanning_port: u16) -> Node {
        Node {
            proxy: app.proxy,
            admin: app.admin,
            scanning: ([127, 0, 0, 1], scanning_port).into(),
        }
    }

    async fn status(&self, key: &str) -> u16 {
        self.get(key).await.status().as_u16()
    }

    async fn get(&self, key: &str) -> reqwest::Response {
        client()
            .get(format!("http://{}{PATH}", self.proxy))
            .bearer_auth(key)
            .send()
            .await
            .expect("proxy reachable")
    }

    /// A `users:read` key made as root: (id, text).
    async fn create_key(&self) -> (String, String) {
        let resp = client()
            .post(format!("http://{}/v1/keys", self.admin))
            .bearer_auth(ROOT)
            .json(&json!({"label": "leaky", "scopes": ["users:read"]}))
            .send()
            .await
            .expect("admin reachable");
        let body: Value = resp.json().await.unwrap();
        let text = |f: &str| body[f].as_str().expect("created").to_string();
        (text("id"), text("key"))
    }

    async fn metrics(&self) -> String {
        let resp = client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("admin reachable");
        resp.text().await.unwrap()
    }

    /// One series' value as rendered (`name{labels}`), 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        (self.metrics().await.lines())
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// A keygate child process with the secret-scanning listener, killed on drop (its log
/// is printed if the test failed).
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
    node: Node,
}

impl Process {
    fn spawn(
        dir: &Path,
        name: &'static str,
        redis: &Redis,
        upstream: SocketAddr,
        scanning: &str,
    ) -> Process {
        let (proxy, admin, scan) = (free_port(), free_port(), free_port());
        let mut config = TEST_CONFIG.to_string();
        for port in [proxy, admin] {
            config = config.replacen(
                "listen: 127.0.0.1:0\n",
                &format!("listen: 127.0.0.1:{port}\n"),
                1,
            );
        }
        let store = format!(
            "redis: {{ url: \"{}\", namespace: kgtest, timeout: 1s }}",
            redis.url
        );
        let config = config
            .replace("{upstream}", &format!("http://{upstream}"))
            .replace("{store}", &store)
            + &scanning.replace("{port}", &scan.to_string());
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEYGATE_")) {
            cmd.env_remove(k);
        }
        let child = cmd
            .args(["serve", "--config"])
            .arg(&file)
            .env("KEYGATE_ROOT_TOKEN", ROOT)
            .env("KEYGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start keygate");
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Process {
            name,
            child,
            log,
            node: Node {
                proxy: addr(proxy),
                admin: addr(admin),
                scanning: addr(scan),
            },
        }
    }

    /// Ready and following the change feed (so a cache warmed now stays warm).
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("keygate {} exited with {status}: {}", self.name, self.log());
            }
            let metrics = client()
                .get(format!("http://{}/metrics", self.node.admin))
                .send()
                .await;
            let text = match metrics {
                Ok(resp) => resp.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if text.lines().any(|l| l == "keygate_pubsub_connected 1") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "keygate {} never ready",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for a log line holding every one of `needles`; it is returned.
    async fn wait_log_line(&self, needles: &[&str]) -> String {
        let found = std::cell::RefCell::new(None);
        eventually(Duration::from_secs(5), || async {
            let log = self.log();
            let line = log.lines().find(|l| needles.iter().all(|n| l.contains(n)));
            *found.borrow_mut() = line.map(str::to_string);
            found.borrow().is_some()
        })
        .await;
        let found = found.into_inner();
        found.unwrap_or_else(|| panic!("no log line with {needles:?}:\n{}", self.log()))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- keygate {} log ---\n{}", self.name, self.log());
        }
    }
}

async fn echo_upstream() -> SocketAddr {
    keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_report_revokes_a_live_key_on_every_replica() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let upstream = echo_upstream().await;
    let scanner = ScannerKey::new("github-key-1");
    let other = ScannerKey::new("github-key-2");
    let scanning = section("{port}", "revoke", &[&other, &scanner]);
    let mut pa = Process::spawn(dir.path(), "a", &redis, upstream, &scanning);
    let mut pb = Process::spawn(dir.path(), "b", &redis, upstream, &scanning);
    pa.wait_ready().await;
    pb.wait_ready().await;
    let (a, b) = (&pa.node, &pb.node);

    // A live key, in both replicas' caches.
    let (id, leaked) = a.create_key().await;
    let (_, bystander) = a.create_key().await;
    assert_eq!(a.status(&leaked).await, 200);
    assert_eq!(b.status(&leaked).await, 200);
    assert_eq!(a.status(&bystander).await, 200);

    // Reported to A: with a token of another format and a well-formed unknown key.
    let unknown = unknown_key();
    let tokens = [
        leaked.as_str(),
        "ghp_notakeygatekey000000000000000000000",
        &unknown,
    ];
    let got = labels(report(a.scanning, &scanner, &tokens).await, &tokens).await;
    assert_eq!(got, ["true_positive", "false_positive", "false_positive"]);

    // Refused on A at once, on B (answering from its cache) within a second.
    assert_error(a.get(&leaked).await, 403, "revoked_key").await;
    let refused = eventually(Duration::from_secs(1), || async {
        b.status(&leaked).await == 403
    })
    .await;
    assert!(refused, "B still accepts the reported key after 1 s");
    assert_error(b.get(&leaked).await, 403, "revoked_key").await;
    assert_eq!(b.status(&bystander).await, 200, "another key is untouched");

    // Reported again (scanners retry): still true_positive, nothing more to revoke.
    let again = labels(report(a.scanning, &scanner, &[&leaked]).await, &[&leaked]).await;
    assert_eq!(again, ["true_positive"]);

    // The bare URL works too, on the other replica.
    let body = body(&[&bystander]);
    let resp = post(
        b.scanning,
        "/",
        &body,
        Some(scanner.identifier),
        Some(&scanner.sign(&body)),
    )
    .await;
    assert_eq!(labels(resp, &[&bystander]).await, ["true_positive"]);
    let refused = eventually(Duration::from_secs(1), || async {
        a.status(&bystander).await == 403
    })
    .await;
    assert!(refused, "A still accepts a key reported to B after 1 s");

    // Counted by label and action; the audit event names the key, never the token.
    let series = |label: &str, action: &str| {
        format!("keygate_secret_scanning_tokens_total{{action=\"{action}\",label=\"{label}\"}}")
    };
    assert_eq!(a.metric(&series("true_positive", "revoked")).await, 1.0);
    assert_eq!(
        a.metric(&series("true_positive", "already_revoked")).await,
        1.0
    );
    assert_eq!(a.metric(&series("false_positive", "none")).await, 2.0);
    let line = pa.wait_log_line(&["keygate::audit", &id, "revoked"]).await;
    assert!(line.contains(URL) && line.contains(SOURCE), "{line}");
    assert!(!pa.log().contains(&leaked), "the token is in A's log");
}

/// An in-process keygate with the listener, on memory or Redis.
async fn in_process(store: Store<'_>, action: &str, keys: &[&ScannerKey]) -> (TestApp, Node) {
    let port = free_port();
    let config = format!("{TEST_CONFIG}{}", section(port, action, keys));
    let app = spawn_app_with(&config, store).await;
    let node = Node::of(&app, port);
    (app, node)
}

/// A report that must be refused: (what, body, identifier, signature, error code).
type Refused<'a> = (&'a str, Vec<u8>, Option<&'a str>, Option<String>, &'a str);

#[tokio::test]
async fn unsigned_tampered_or_unknown_signer_reports_are_401_and_revoke_nothing() {
    let redis = Redis::start();
    let scanner = ScannerKey::new("k1");
    let stranger = ScannerKey::new("k1");
    let (app, node) = in_process(Store::Redis(&redis), "revoke", &[&scanner]).await;
    let key = app.create_key(&["users:read"]).await;
    let body = body(&[&key.key]);
    let good = scanner.sign(&body);
    let mut tampered = body.clone();
    let at = tampered.len() - 3;
    tampered[at] ^= 0x20;
    let path = "/v1/secret-scanning";
    let id = Some("k1");
    let cases: [Refused; 7] = [
        (
            "tampered body",
            tampered,
            id,
            Some(good.clone()),
            "signature_invalid",
        ),
        (
            "unknown identifier",
            body.clone(),
            Some("k2"),
            Some(good.clone()),
            "signature_key_unknown",
        ),
        (
            "another key's signature",
            body.clone(),
            id,
            Some(stranger.sign(&body)),
            "signature_invalid",
        ),
        ("no signature", body.clone(), id, None, "signature_missing"),
        (
            "no identifier",
            body.clone(),
            None,
            Some(good.clone()),
            "signature_missing",
        ),
        (
            "not base64",
            body.clone(),
            id,
            Some("%%%".into()),
            "signature_invalid",
        ),
        (
            "not DER",
            body.clone(),
            id,
            Some("AAAA".into()),
            "signature_invalid",
        ),
    ];
    for (what, body, identifier, signature, code) in cases {
        let resp = post(node.scanning, path, &body, identifier, signature.as_deref()).await;
        assert_eq!(resp.status(), 401, "{what}");
        assert!(resp.headers().get("www-authenticate").is_none(), "{what}");
        assert_error(resp, 401, code).await;
        assert_eq!(node.status(&key.key).await, 200, "{what} revoked the key");
    }
    let refused = "keygate_secret_scanning_refused_total{reason=\"bad_signature\"}";
    assert_eq!(node.metric(refused).await, 4.0);

    // The signed original still works afterwards.
    let got = labels(
        report(node.scanning, &scanner, &[&key.key]).await,
        &[&key.key],
    )
    .await;
    assert_eq!(got, ["true_positive"]);
    assert_error(node.get(&key.key).await, 403, "revoked_key").await;
    app.stop().await;
}

#[tokio::test]
async fn hostile_reports_are_refused_cleanly() {
    let scanner = ScannerKey::new("k1");
    let (app, node) = in_process(Store::Memory, "revoke", &[&scanner]).await;
    let key = app.create_key(&["users:read"]).await;
    let signed = |body: &[u8]| (body.to_vec(), scanner.sign(body));
    let many = format!("[{}]", vec!["{\"token\":\"x\"}"; 1001].join(","));
    for (what, body, status, code) in [
        ("not JSON", signed(b"token=abc"), 400, "invalid_body"),
        (
            "an object",
            signed(b"{\"token\":\"a\"}"),
            400,
            "invalid_body",
        ),
        (
            "a number token",
            signed(b"[{\"token\":1}]"),
            400,
            "invalid_body",
        ),
        (
            "a report as an array",
            signed(b"[[\"sk_live_x\", \"keygate_api_key\"]]"),
            400,
            "invalid_body",
        ),
        (
            "text after the array",
            signed(b"[{\"token\":\"a\"}] x"),
            400,
            "invalid_body",
        ),
        (
            "deep nesting",
            signed("[".repeat(10_000).as_bytes()),
            400,
            "invalid_body",
        ),
        (
            "too many tokens",
            signed(many.as_bytes()),
            400,
            "invalid_body",
        ),
        (
            "over 1 MiB",
            signed(&vec![b' '; (1 << 20) + 1]),
            413,
            "body_too_large",
        ),
    ] {
        let (body, sig) = body;
        let resp = post(
            node.scanning,
            "/v1/secret-scanning",
            &body,
            Some("k1"),
            Some(&sig),
        )
        .await;
        assert_error(resp, status, code).await;
        println!("{what}: {status} {code}");
    }
    // Not the report path, not POST.
    let resp = post(node.scanning, "/v1/keys", b"[]", None, None).await;
    assert_eq!(resp.status(), 404);
    let resp = client()
        .get(format!("http://{}/", node.scanning))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    // An empty report is answered with an empty list; the listener is still well.
    let resp = report(node.scanning, &scanner, &[]).await;
    assert_eq!(labels(resp, &[]).await, Vec::<String>::new());
    assert_eq!(node.status(&key.key).await, 200);
    // The admin port has no report endpoint.
    let resp = post(
        node.admin,
        "/v1/secret-scanning",
        b"[]",
        Some("k1"),
        Some("x"),
    )
    .await;
    assert_eq!(resp.status(), 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_revokes_nothing_and_writes_the_audit_event() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let upstream = echo_upstream().await;
    let scanner = ScannerKey::new("github-key-1");
    let scanning = section("{port}", "report", &[&scanner]);
    let mut p = Process::spawn(dir.path(), "r", &redis, upstream, &scanning);
    p.wait_ready().await;
    let node = &p.node;
    let (id, leaked) = node.create_key().await;
    let got = labels(
        report(node.scanning, &scanner, &[&leaked, "hunter2"]).await,
        &[&leaked, "hunter2"],
    )
    .await;
    assert_eq!(got, ["true_positive", "false_positive"]);
    assert_eq!(
        node.status(&leaked).await,
        200,
        "report mode revoked the key"
    );
    let line = p
        .wait_log_line(&["keygate::audit", &id, "action=\"reported\""])
        .await;
    for needle in ["label=\"true_positive\"", URL, SOURCE, "WARN"] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
    p.wait_log_line(&["keygate::audit", "false_positive", URL])
        .await;
    let log = p.log();
    assert!(!log.contains(&leaked), "the token is in the log");
    assert!(!log.contains("hunter2"), "a reported token is in the log");
    let series =
        "keygate_secret_scanning_tokens_total{action=\"reported\",label=\"true_positive\"}";
    assert_eq!(node.metric(series).await, 1.0);
}

/// The README's regular expression for scanners (the `regex` block of "Leaked keys"),
/// with `\b` made ASCII (this regex build has no Unicode word tables).
fn published_regex() -> regex::Regex {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Leaked keys")
        .nth(1)
        .expect("README has a `## Leaked keys` section");
    let pattern = section
        .split("```regex\n")
        .nth(1)
        .and_then(|s| s.split('\n').next())
        .expect("a regex block");
    regex::Regex::new(&pattern.replace(r"\b", r"(?-u:\b)")).expect("a valid regex")
}

/// The README's description of the checksum: base62 of the CRC-32 of what precedes it.
fn published_checksum(signed: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut n = u64::from(crc32fast::hash(signed.as_bytes()));
    let mut digits = vec![b'0'; 6];
    for d in digits.iter_mut().rev() {
        *d = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(digits).unwrap()
}

#[test]
fn the_published_regex_and_checksum_match_every_key_type() {
    use keygate::key::{generate, Environment, KeyType, Prefixes};
    let re = published_regex();
    for t in [KeyType::Secret, KeyType::Publishable] {
        for e in [Environment::Live, Environment::Test] {
            for _ in 0..50 {
                let key = generate(&Prefixes::default(), t, e).expect("os rng").text;
                let line = format!("API_KEY=\"{key}\"\n");
                let found = re.find(&line).map(|m| m.as_str());
                assert_eq!(found, Some(key.as_str()));
                let (signed, sum) = key.split_at(key.len() - 6);
                assert_eq!(published_checksum(signed), sum, "{key}");
            }
        }
    }
    let key = generate(&Prefixes::default(), KeyType::Secret, Environment::Live)
        .unwrap()
        .text;
    for near in [
        format!("x{key}"),
        format!("{key}x"),
        key[..key.len() - 1].to_string(),
        key.replace("sk_live_", "sk_prod_"),
    ] {
        assert!(!re.is_match(&near), "{near}");
    }
}

#[tokio::test]
async fn the_listener_serves_https_with_secret_scanning_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("scan.crt"), dir.path().join("scan.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let scanner = ScannerKey::new("k1");
    let port = free_port();
    let tls = format!(
        "  tls: {{ cert: \"{}\", key: \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let config = format!("{TEST_CONFIG}{}{tls}", section(port, "revoke", &[&scanner]));
    let app = spawn_app_with(&config, Store::Memory).await;
    let leaked = app.create_key(&["users:read"]).await;
    let https = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let body = body(&[&leaked.key]);
    let resp = https
        .post(format!("https://localhost:{port}/v1/secret-scanning"))
        .header("GITHUB-PUBLIC-KEY-IDENTIFIER", "k1")
        .header("GITHUB-PUBLIC-KEY-SIGNATURE", scanner.sign(&body))
        .body(body)
        .send()
        .await
        .expect("HTTPS listener");
    assert_eq!(labels(resp, &[&leaked.key]).await, ["true_positive"]);
    assert_error(app.get_with(PATH, &leaked.key).await, 403, "revoked_key").await;
    // Plain HTTP is not answered on a TLS listener.
    let plain = client()
        .post(format!("http://127.0.0.1:{port}/v1/secret-scanning"))
        .body("[]")
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    app.stop().await;
}
