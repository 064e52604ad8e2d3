//! The `keygate` binary: `check-config` (route table, or exit 64 with file, line and
//! field), `serve --config` refusing a bad file before it starts, and `serve --dev`
//! end to end (printed root token, a key, a proxied call, SIGTERM, exit 0).

use crate::support::free_port;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const EX_CONFIG: i32 = 64;

/// The keygate binary with no `KEYGATE_*` variables inherited from the test's environment.
fn keygate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEYGATE_")) {
        cmd.env_remove(k);
    }
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    cmd
}

/// Run to completion, within 15 s.
async fn run(cmd: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .expect("keygate did not exit within 15 s")
        .expect("run keygate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits (up to 20 s) for `admin`'s /readyz to answer 200, or fails the test.
async fn wait_ready(http: &reqwest::Client, admin: &str) {
    let up = crate::support::eventually(Duration::from_secs(20), || async {
        http.get(format!("{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(up, "keygate did not become ready at {admin}");
}

/// SIGTERM, then up to 15 s for the process to exit (its logs are written by then).
async fn stop(child: &mut tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
}

/// A valid config (`{port}` is the proxy port); line numbers matter to the tests below.
const GOOD: &str = "proxy:
  listen: 127.0.0.1:{port}
  upstream: http://127.0.0.1:3000
store:
  memory: {}
routes:
  - { name: health, path: /healthz, auth: none }
";

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Assert exit 64 with an `error:` on stderr containing every one of `needles`.
fn assert_config_error(out: &Output, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "stderr: {stderr}");
    assert!(stderr.contains("error:"), "stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_prints_the_route_table() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keygate.yaml");
    let out = run(keygate().arg("check-config").arg(&file)).await;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status,
        text(&out.stderr)
    );
    assert!(stdout.contains("OK"), "stdout: {stdout}");
    for route in [
        "health",
        "users-read",
        "users-write",
        "widgets",
        "/users/**",
    ] {
        assert!(
            stdout.contains(route),
            "route table lacks {route}: {stdout}"
        );
    }
    // The columns line up: each row's `auth` cell starts under the header's `auth`.
    let auth_column = |line: &str, word: &str| line.find(&format!(" {word} ")).map(|i| i + 1);
    let mut rows = stdout.lines().skip_while(|l| !l.starts_with('#'));
    let header = rows
        .next()
        .unwrap_or_else(|| panic!("no table header: {stdout}"));
    let column = auth_column(header, "auth");
    for row in rows.take_while(|l| !l.starts_with("unmatched")) {
        let cell = auth_column(row, "key").or_else(|| auth_column(row, "none"));
        assert_eq!(cell, column, "misaligned row {row:?} in\n{stdout}");
    }
    // The good file for the other tests is itself good.
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.yaml", &GOOD.replace("{port}", "0"));
    let out = run(keygate().arg("check-config").arg(&good)).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();

    // Unknown field on line 4.
    let bad = GOOD
        .replace("{port}", "0")
        .replace("3000\n", "3000\n  lisen: 127.0.0.1:1\n");
    let file = write(dir.path(), "unknown-field.yaml", &bad);
    let path = file.display().to_string();
    let out = run(keygate().arg("check-config").arg(&file)).await;
    assert_config_error(&out, &[&format!("{path}:4"), "lisen"]);
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));

    // A bad duration on line 8.
    let bad = format!(
        "{}cache: {{ ttl: 5 parsecs }}\n",
        GOOD.replace("{port}", "0")
    );
    let file = write(dir.path(), "bad-duration.yaml", &bad);
    let path = file.display().to_string();
    let out = run(keygate().arg("check-config").arg(&file)).await;
    assert_config_error(&out, &[&format!("{path}:8"), "cache.ttl"]);

    // A missing file.
    let missing = dir.path().join("no-such-file.yaml");
    let path = missing.display().to_string();
    let out = run(keygate().arg("check-config").arg(&missing)).await;
    assert_config_error(&out, &[&path, "cannot read"]);
}

/// What `check-config` prints on stderr for each broken file: a line that starts with
/// `error: FILE:LINE: field `FIELD`: MESSAGE` (for YAML syntax, no field), the line being
/// the value's, that of the mapping that lacks a field, or where a `{` opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_points_at_the_line_of_the_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let good = GOOD.replace("{port}", "0");
    let cases = [
        (
            "redis-timeout.yaml",
            good.replace(
                "  memory: {}\n",
                "  redis:\n    url: redis://127.0.0.1:6379\n    timeout: 5 lightyears\n",
            ),
            ":7: field `store.redis.timeout`: invalid duration \"5 lightyears\"",
        ),
        (
            "no-upstream.yaml",
            good.replace("  upstream: http://127.0.0.1:3000\n", ""),
            ":1: field `proxy.upstream`: required field is missing",
        ),
        (
            "duplicate-route.yaml",
            format!("{good}  - name: health\n    path: /other\n"),
            ":8: field `routes[2].name`: duplicate route name \"health\"",
        ),
        (
            "unclosed.yaml",
            good.replace("memory: {}", "memory: {"),
            ":5: YAML syntax: the `{` opened on this line is still open at line 7 column 3 \
             (did not find expected node content there); is a `}` missing?",
        ),
        (
            "tab.yaml",
            good.replace("  upstream", "\tupstream"),
            ":3: tab character used for indentation; YAML indents with spaces",
        ),
    ];
    for (name, contents, want) in cases {
        let file = write(dir.path(), name, &contents);
        let out = run(keygate().arg("check-config").arg(&file)).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(EX_CONFIG), "{name}: {stderr}");
        let want = format!("error: {}{want}", file.display());
        assert!(
            stderr.lines().any(|l| l.starts_with(&want)),
            "{name}: stderr lacks {want:?}:\n{stderr}"
        );
    }
}

/// The command line says what it needs: `serve` wants `--config` or `--dev`, `--upstream`
/// belongs to `--dev` (it used to be ignored with `--config`), and `--help` lists the
/// environment and the exit codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_refuses_what_it_would_ignore_and_documents_itself() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let file = write(
        dir.path(),
        "good.yaml",
        &GOOD.replace("{port}", &port.to_string()),
    );
    let out = run(keygate()
        .args(["serve", "--config"])
        .arg(&file)
        .args(["--upstream", "http://127.0.0.1:1"]))
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("--upstream works with --dev only"),
        "stderr: {stderr}"
    );
    let out = run(keygate().arg("serve")).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("Usage: keygate serve <--config <CONFIG>|--dev>"),
        "stderr: {stderr}"
    );
    for args in [&["--help"][..], &["serve", "--help"]] {
        let out = run(keygate().args(args)).await;
        let help = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {help}");
        for needle in [
            "KEYGATE_ROOT_TOKEN",
            "KEYGATE_REDIS_URL",
            "KEYGATE_LOG ",
            "KEYGATE_LOG_FORMAT",
            "KEYGATE_PEPPER",
            "KEYGATE_UPSTREAM",
            "Exit codes:",
            "64  the config file is invalid",
        ] {
            assert!(help.contains(needle), "{args:?} lacks {needle:?}: {help}");
        }
    }
}

/// One start line says where keygate listens, which store and how many routes; without a
/// root token a warning says how to set one, and the admin API's 401 says so too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_line_and_a_missing_root_token_are_spelled_out() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let config = format!(
        "{}admin:\n  listen: 127.0.0.1:{admin_port}\n",
        GOOD.replace("{port}", &proxy_port.to_string())
    );
    let path = write(dir.path(), "keygate.yaml", &config);
    let log_path = dir.path().join("stderr.log");
    let mut child = keygate()
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("start keygate");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    wait_ready(&http, &admin).await;
    let r = http
        .post(format!("{admin}/v1/keys"))
        .bearer_auth("kgroot_what_the_operator_thinks_is_root")
        .json(&json!({"label": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no root token is configured") && message.contains("KEYGATE_ROOT_TOKEN"),
        "{body}"
    );
    stop(&mut child).await;
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let started: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("keygate started"))
        .collect();
    assert_eq!(started.len(), 1, "{logs}");
    for needle in [
        format!("proxy=127.0.0.1:{proxy_port}"),
        format!("admin=127.0.0.1:{admin_port}"),
        "upstream=http://127.0.0.1:3000".into(),
        "store=memory".into(),
        "routes=1".into(),
    ] {
        assert!(started[0].contains(&needle), "{needle}: {}", started[0]);
    }
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("no root token is configured")),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_bad_config_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bad = format!(
        "{}cache: {{ ttl: 5 parsecs }}\n",
        GOOD.replace("{port}", &port.to_string())
    );
    let file = write(dir.path(), "bad.yaml", &bad);
    let path = file.display().to_string();
    let out = run(keygate().args(["serve", "--config"]).arg(&file)).await;
    assert_config_error(&out, &[&format!("{path}:8"), "cache.ttl"]);
    assert!(
        !text(&out.stderr).contains("keygate started"),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something listens on the proxy port of the refused config"
    );

    let out = run(keygate()
        .args(["serve", "--config"])
        .arg(dir.path().join("missing.yaml")))
    .await;
    assert_config_error(&out, &["missing.yaml", "cannot read"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_dev_end_to_end_and_sigterm_exits_zero() {
    let (proxy_port, admin_port) = (free_port(), free_port());
    let mut child = keygate()
        .args(["serve", "--dev"])
        .env("KEYGATE_PROXY_LISTEN", format!("127.0.0.1:{proxy_port}"))
        .env("KEYGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start keygate --dev");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let mut banner = String::new();
    let token = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            banner.push_str(&line);
            banner.push('\n');
            if let Some(t) = line.split("root token:").nth(1) {
                return Some(t.trim().to_string());
            }
        }
        None
    })
    .await
    .expect("no root token line within 20 s")
    .unwrap_or_else(|| panic!("stdout ended without a root token line: {banner}"));
    assert!(token.len() >= 16, "root token {token:?}");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let proxy = format!("http://127.0.0.1:{proxy_port}");

    let resp = http
        .post(format!("{admin}/v1/keys"))
        .bearer_auth(&token)
        .json(&json!({"label": "cli", "scopes": ["users:read"]}))
        .send()
        .await
        .expect("admin reachable on KEYGATE_ADMIN_LISTEN");
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let (id, key) = (
        created["id"].as_str().unwrap(),
        created["key"].as_str().unwrap(),
    );

    let resp = http
        .get(format!("{proxy}/users/1"))
        .bearer_auth(key)
        .send()
        .await
        .expect("proxy reachable on KEYGATE_PROXY_LISTEN");
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["path"], "/users/1", "{echo}");
    let h = &echo["headers"];
    assert_eq!(h["x-keygate-key-id"][0], id, "{echo}");
    assert_eq!(h["x-keygate-scopes"][0], "users:read", "{echo}");
    assert_eq!(h["x-keygate-key-type"][0], "secret", "{echo}");
    assert!(h["x-keygate-tenant"][0].is_string(), "{echo}");
    assert!(h.get("authorization").is_none(), "key forwarded: {echo}");

    // Without a key: refused by keygate, not the echo server.
    let resp = http.get(format!("{proxy}/users/1")).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("keygate did not exit within 15 s of SIGTERM")
        .unwrap();
    println!("exited {status} {:?} after SIGTERM", started.elapsed());
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
}

/// SIGHUP reloads without stopping; SIGTERM turns readiness off, lets a slow in-flight
/// request finish, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_drains_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let config = format!(
        "proxy:\n  listen: 127.0.0.1:{proxy_port}\n  upstream: http://{upstream}\n\
         admin:\n  listen: 127.0.0.1:{admin_port}\n\
         store:\n  memory: {{}}\n\
         routes:\n  - {{ name: slow, path: /__sleep, auth: none }}\n"
    );
    let path = write(dir.path(), "keygate.yaml", &config);
    let mut child = keygate()
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start keygate");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    wait_ready(&http, &admin).await;
    let pid = child.id().expect("running").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    };

    signal("-HUP");
    let reloaded = crate::support::eventually(Duration::from_secs(5), || async {
        let text = http
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.contains("keygate_config_reloads_total{result=\"success\"} 1")
    })
    .await;
    assert!(reloaded, "SIGHUP did not reload");

    let slow = {
        let http = http.clone();
        tokio::spawn(async move {
            http.get(format!("http://127.0.0.1:{proxy_port}/__sleep?ms=1500"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    // Let the slow request reach the upstream, then ask keygate to stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal("-TERM");
    let not_ready = crate::support::eventually(Duration::from_secs(2), || async {
        match http.get(format!("{admin}/readyz")).send().await {
            Ok(r) => r.status() == 503,
            Err(_) => true,
        }
    })
    .await;
    assert!(not_ready, "readiness stayed true after SIGTERM");
    assert_eq!(
        slow.await.unwrap().expect("in-flight request failed"),
        200,
        "the in-flight request was not drained"
    );
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("keygate did not exit after draining")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
}

/// Logs (debug level, text and JSON) never carry a key or an Authorization header; the
/// access log has one line per request with the key id, `unmatched` for no route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_keys_and_access_lines_carry_ids() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        let (proxy_port, admin_port) = (free_port(), free_port());
        let config = format!(
            "proxy:\n  listen: 127.0.0.1:{proxy_port}\n  upstream: http://{upstream}\n\
             admin:\n  listen: 127.0.0.1:{admin_port}\n\
             store:\n  memory: {{}}\n\
             routes:\n  - {{ name: users, path: \"/users/**\", scopes: [\"users:read\"] }}\n"
        );
        let path = write(dir.path(), "keygate.yaml", &config);
        let log_path = dir.path().join("stderr.log");
        let mut child = keygate()
            .args(["serve", "--config"])
            .arg(&path)
            .env("KEYGATE_ROOT_TOKEN", crate::support::ROOT)
            .env("KEYGATE_LOG", "debug")
            .env("KEYGATE_LOG_FORMAT", format)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("start keygate");
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let admin = format!("http://127.0.0.1:{admin_port}");
        let proxy = format!("http://127.0.0.1:{proxy_port}");
        wait_ready(&http, &admin).await;
        let created: Value = http
            .post(format!("{admin}/v1/keys"))
            .bearer_auth(crate::support::ROOT)
            .json(&json!({"label": "log", "scopes": ["users:read"]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let key = created["key"].as_str().unwrap().to_string();
        let id = created["id"].as_str().unwrap().to_string();
        let r = http
            .get(format!("{proxy}/users/1"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let last = if key.ends_with('x') { 'y' } else { 'x' };
        let typo = format!("{}{last}", &key[..key.len() - 1]);
        http.get(format!("{proxy}/users/2"))
            .bearer_auth(&typo)
            .send()
            .await
            .unwrap();
        http.delete(format!("{admin}/v1/keys/{id}"))
            .bearer_auth(crate::support::ROOT)
            .send()
            .await
            .unwrap();
        let r = http
            .get(format!("{proxy}/users/3"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let r = http
            .get(format!("{proxy}/nowhere"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        stop(&mut child).await;

        let logs = std::fs::read_to_string(&log_path).unwrap();
        let secret_part = &key["sk_live_".len() + 4..];
        for needle in [key.as_str(), secret_part, &typo, crate::support::ROOT] {
            assert!(
                !logs.contains(needle),
                "{format} logs contain a secret: {logs}"
            );
        }
        assert!(
            !logs.to_ascii_lowercase().contains("bearer "),
            "{format} logs: {logs}"
        );
        let mut access: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("keygate::access"))
            .collect();
        // Workers hand their lines over in batches: order by the leading timestamp.
        access.sort_unstable();
        assert_eq!(
            access.len(),
            4,
            "{format}: one access line per proxied request: {logs}"
        );
        assert!(
            access[0].contains(&id) && access[0].contains("allowed"),
            "{}",
            access[0]
        );
        assert!(access[1].contains("malformed_key"), "{}", access[1]);
        assert!(
            access[2].contains("revoked_key") && access[2].contains(&id),
            "{}",
            access[2]
        );
        // The same route name as the metrics label of a request no route matched.
        assert!(
            access[3].contains("no_route") && access[3].contains("unmatched"),
            "{}",
            access[3]
        );
        if format == "json" {
            for line in logs.lines().filter(|l| !l.trim().is_empty()) {
                serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            }
        }
    }
}

/// A log reader that stops reading (a full pipe) never holds up requests: lines past the
/// writer's queue are dropped and counted in `keygate_log_lines_dropped_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_drops_lines_instead_of_requests() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let config = format!(
        "proxy:\n  listen: 127.0.0.1:{proxy_port}\n  upstream: http://{upstream}\n\
         admin:\n  listen: 127.0.0.1:{admin_port}\n\
         store:\n  memory: {{}}\n\
         routes:\n  - {{ name: open, path: \"/**\", auth: none }}\n"
    );
    let path = write(dir.path(), "keygate.yaml", &config);
    // stderr is a pipe nobody reads: it is full after ~64 KiB, a few hundred lines.
    let _child = keygate()
        .args(["serve", "--config"])
        .arg(&path)
        .env("KEYGATE_ROOT_TOKEN", crate::support::ROOT)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start keygate");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    wait_ready(&http, &admin).await;
    // More access lines than the writer queues (64 batches of 32 KiB: ~10,000 lines)
    // and the pipe holds, over 8 connections.
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (http, url) = (http.clone(), format!("http://127.0.0.1:{proxy_port}/x"));
            tokio::spawn(async move {
                for i in 0..2_200 {
                    let r = http.get(&url).send().await;
                    let status = r.map(|r| r.status().as_u16());
                    assert_eq!(status.ok(), Some(200), "task {t}, request {i}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let metrics = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keygate_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dropped-lines counter: {metrics}"));
    assert!(dropped > 0, "{metrics}");
}

/// A README shell block, pasted as it is (ports moved to free ones) into bash against a
/// fresh `serve --dev` with `ROOT` set: its standard output. Needs `jq` and `curl`, which
/// scripts/test installs.
async fn run_readme_block(block: &str) -> String {
    let (proxy_port, admin_port) = (free_port(), free_port());
    let script = block
        .replace("localhost:8080", &format!("127.0.0.1:{proxy_port}"))
        .replace("localhost:9901", &format!("127.0.0.1:{admin_port}"));
    let root = "kgroot_readme_walk_through_0123456789";
    let _child = keygate()
        .args(["serve", "--dev"])
        .env("KEYGATE_PROXY_LISTEN", format!("127.0.0.1:{proxy_port}"))
        .env("KEYGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("KEYGATE_ROOT_TOKEN", root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start keygate --dev");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    wait_ready(&http, &format!("http://127.0.0.1:{admin_port}")).await;
    assert!(
        std::process::Command::new("jq")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "README blocks need jq: apt-get install jq (scripts/test installs it)"
    );
    let out = run(Command::new("bash")
        .args(["-eu", "-o", "pipefail", "-c", &script])
        .env("ROOT", root)
        .env("NO_PROXY", "*"))
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", text(&out.stderr));
    stdout
}

/// The `lang` code block that follows `heading` in the README, the `nth` one (from 1).
fn readme_block(heading: &str, lang: &str, nth: usize) -> &'static str {
    let readme = include_str!("../../README.md");
    readme
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("README has {heading:?}"))
        .split(&format!("```{lang}\n"))
        .nth(nth)
        .and_then(|b| b.split("```").next())
        .unwrap_or_else(|| panic!("README's {heading:?} has a {lang} block {nth}"))
}

/// The README's walk-through against `serve --dev`: every answer it promises comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walk_through_runs_as_pasted() {
    // The second sh block: the first only sets ROOT.
    let stdout = run_readme_block(readme_block("### Walk-through", "sh", 2)).await;
    let statuses: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("HTTP/1.1 "))
        .map(|l| &l[..3])
        .collect();
    assert_eq!(statuses, ["401", "200", "403", "403"], "{stdout}");
    for needle in [
        "missing_key",
        "x-keygate-key-id",
        "insufficient_scope",
        "scope=\"users:write\"",
        "revoked_key",
    ] {
        assert!(stdout.contains(needle), "lacks {needle:?}: {stdout}");
    }
}

/// The README's rate-limit example against `serve --dev`: the key is made with its
/// limits and credits, an admitted answer names the closest limit, both PATCHes apply,
/// and the usage shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_rate_limit_example_runs_as_pasted() {
    let stdout = run_readme_block(readme_block("## Rate limits and credits", "bash", 1)).await;
    let lines: Vec<&str> = stdout.lines().collect();
    let [policy, state, raised, unlimited, usage] = lines[..] else {
        panic!("expected two headers and three JSON answers: {stdout}")
    };
    assert_eq!(
        policy.trim_end(),
        r#"ratelimit-policy: "requests";q=100;w=1"#,
        "{stdout}"
    );
    assert!(
        state.starts_with(r#"ratelimit: "requests";r=99;t="#),
        "{stdout}"
    );
    let json =
        |l: &str| -> Value { serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")) };
    let (raised, unlimited, usage) = (json(raised), json(unlimited), json(usage));
    let requests = json!([{"name": "requests", "limit": 200, "duration": "1s"}]);
    assert_eq!(raised["ratelimits"], requests, "{raised}");
    // Spending reaches the key object and the usage totals at the next exchange (one
    // `sync_interval`, 50 ms, on a memory store), which the PATCHes may not outlast.
    let spent = raised["credits"]["remaining"].as_u64();
    assert!(matches!(spent, Some(999 | 1000)), "{raised}");
    assert_eq!(unlimited["credits"], Value::Null, "{unlimited}");
    assert_eq!(usage["ratelimits"][0]["limit"], 200, "{usage}");
    assert_eq!(usage["credits"], Value::Null, "{usage}");
    let admitted = usage["requests"]["admitted"].as_u64();
    assert!(matches!(admitted, Some(0 | 1)), "{usage}");
    assert_eq!(usage["requests"]["refused"], 0, "{usage}");
}

/// The README's VM set-up: its config passes `check-config` with the environment file
/// beside it (a pepper the config does not name is refused, so the two must agree).
#[tokio::test]
async fn readme_vm_config_checks_with_its_environment_file() {
    let heading = "### Fronting a legacy service on a VM";
    let yaml: String = readme_block(heading, "yaml", 1)
        .lines()
        .map(|l| l.strip_prefix("   ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let env_file = readme_block(heading, "sh", 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keygate.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = keygate();
    for line in env_file.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once('=').expect("NAME=value");
        // `<openssl rand -hex 32 …>` stands for a secret: any 32 bytes in hex.
        let value = if value.starts_with('<') {
            "0123456789abcdef".repeat(4)
        } else {
            value.into()
        };
        cmd.env(name, value);
    }
    let out = run(cmd.arg("check-config").arg(&file)).await;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The README's explain example against `serve --dev`: the DELETE is refused for the
/// missing scope, the GET by key id allowed, as its comments say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_explain_example_runs_as_pasted() {
    let stdout = run_readme_block(readme_block("## Explaining a decision", "bash", 1)).await;
    let answers: Vec<Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let [delete, get] = &answers[..] else {
        panic!("expected two answers: {stdout}")
    };
    assert_eq!(delete["normalized_path"], "/users/42/", "{delete}");
    assert_eq!(delete["decision"]["code"], "insufficient_scope", "{delete}");
    assert_eq!(
        delete["reasons"].as_array().and_then(|r| r.last()),
        Some(&json!("key lacks scope users:write")),
        "{delete}"
    );
    assert_eq!(get["decision"]["allowed"], true, "{get}");
}
