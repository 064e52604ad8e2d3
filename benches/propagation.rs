//! Revocation propagation across replicas: two keygate processes on one Redis. Keys are
//! revoked on A's admin port; we measure until B (whose cache holds the key) refuses it.
//! Run: `cargo bench --bench propagation` (needs `redis-server`; N via KEYGATE_BENCH_N).
//! Prints p50/p99/max; the numbers go into benches/RESULTS.md by hand.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "test and bench code: the request-path rules are for src/"
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = "bench-root-token-0123456789abcdef";

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

fn wait_http(addr: &str, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if request(addr, "GET", path, &[], "").0 == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{addr}{path} did not come up");
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

fn spawn_keygate(
    dir: &std::path::Path,
    name: &str,
    redis_port: u16,
    upstream: u16,
) -> (Kill, String, String) {
    let (p, a) = (free_port(), free_port());
    let cfg = format!(
        "proxy: {{ listen: \"127.0.0.1:{p}\", upstream: \"http://127.0.0.1:{upstream}\" }}\n\
         admin: {{ listen: \"127.0.0.1:{a}\" }}\n\
         store: {{ redis: {{ url: \"redis://127.0.0.1:{redis_port}/0\", namespace: bench }} }}\n\
         routes:\n  - {{ name: any, path: \"/**\" }}\n"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("KEYGATE_ROOT_TOKEN", ROOT)
        .env("KEYGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keygate");
    let admin = format!("127.0.0.1:{a}");
    wait_http(&admin, "/readyz");
    (Kill(child), format!("127.0.0.1:{p}"), admin)
}

fn main() {
    // `cargo test --all-targets` runs benches in test mode with `--bench` absent: skip.
    if !std::env::args().any(|a| a == "--bench") {
        println!("propagation bench: run with `cargo bench --bench propagation`");
        return;
    }
    let n: usize = std::env::var("KEYGATE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let _redis = Kill(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is required"),
    );
    // The upstream: a keygate echo is not needed; B never forwards a refused request and
    // warm-up requests may fail upstream (502) once they passed authentication.
    let upstream = free_port();
    std::thread::sleep(Duration::from_millis(300));
    let (_a, _a_proxy, a_admin) = spawn_keygate(dir.path(), "a", redis_port, upstream);
    let (_b, b_proxy, _b_admin) = spawn_keygate(dir.path(), "b", redis_port, upstream);

    let auth_root = format!("Bearer {ROOT}");
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let (status, body) = request(
            &a_admin,
            "POST",
            "/v1/keys",
            &[
                ("Authorization", &auth_root),
                ("Content-Type", "application/json"),
            ],
            &format!("{{\"label\":\"bench-{i}\"}}"),
        );
        assert_eq!(status, 201, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        keys.push((
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        ));
    }
    // Warm B's cache: every key authenticated once (502 = passed auth, no upstream).
    for (_, key) in &keys {
        let (status, _) = request(
            &b_proxy,
            "GET",
            "/x",
            &[("Authorization", &format!("Bearer {key}"))],
            "",
        );
        assert!(status == 502 || status == 200, "warm-up got {status}");
    }

    let mut lags = Vec::with_capacity(n);
    for (id, key) in &keys {
        let auth = format!("Bearer {key}");
        let t0 = Instant::now();
        let (status, _) = request(
            &a_admin,
            "DELETE",
            &format!("/v1/keys/{id}"),
            &[("Authorization", &auth_root)],
            "",
        );
        assert_eq!(status, 200);
        loop {
            let (status, _) = request(&b_proxy, "GET", "/x", &[("Authorization", &auth)], "");
            if status == 403 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "B never refused the revoked key"
            );
        }
        lags.push(t0.elapsed());
    }
    lags.sort();
    let pct = |p: f64| lags[((lags.len() as f64 * p).ceil() as usize).clamp(1, lags.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let line = format!(
        "revocation propagation A->B over {n} keys (DELETE sent on A until B answers 403): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(*lags.last().unwrap())
    );
    println!("{line}");
    std::io::stdout().flush().ok();
}
