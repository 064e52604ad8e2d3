//! Bodies are streamed, not buffered: 64 MiB up and 64 MiB down through keygate running
//! as a child process, with its resident memory measured before and after.

use crate::support::{eventually, free_port, ROOT, TEST_CONFIG};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use xxhash_rust::xxh3::Xxh3;

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 64 * MIB;
const CHUNK: usize = 64 * 1024;

/// Kills the child when the test ends, also on panic.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("procfs");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Chunk `i` of the upload: 64 KiB of a cheap pseudo-random sequence seeded by `i`.
fn upload_chunk(i: u64) -> Bytes {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(CHUNK);
    while out.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(out)
}

fn upload_hash(chunks: u64) -> String {
    let mut h = Xxh3::new();
    for i in 0..chunks {
        h.update(&upload_chunk(i));
    }
    format!("{:016x}", h.digest())
}

fn upload_body(chunks: u64) -> reqwest::Body {
    let stream =
        futures_util::stream::iter(0..chunks).map(|i| Ok::<_, std::io::Error>(upload_chunk(i)));
    reqwest::Body::wrap_stream(stream)
}

/// Download `/__bytes?n=N` and check every byte (byte i = i % 251) and the length.
async fn download_and_check(http: &reqwest::Client, url: &str, key: &str, n: u64) {
    let mut resp = http
        .get(format!("{url}/__bytes?n={n}"))
        .bearer_auth(key)
        .send()
        .await
        .expect("proxy reachable");
    assert_eq!(resp.status(), 200, "download");
    // pattern[k..] starts with byte value k, for k < 251.
    let pattern: Vec<u8> = (0..251 + CHUNK).map(|i| (i % 251) as u8).collect();
    let mut offset = 0u64;
    while let Some(chunk) = resp.chunk().await.expect("body chunk") {
        for piece in chunk.chunks(CHUNK) {
            let start = (offset % 251) as usize;
            assert!(
                piece == &pattern[start..start + piece.len()],
                "wrong bytes in the download near offset {offset}"
            );
            offset += piece.len() as u64;
        }
    }
    assert_eq!(offset, n, "download length");
}

async fn upload_and_check(http: &reqwest::Client, url: &str, key: &str, chunks: u64) {
    let expected_hash = upload_hash(chunks);
    let resp = http
        .post(format!("{url}/upload/big"))
        .bearer_auth(key)
        .body(upload_body(chunks))
        .send()
        .await
        .expect("proxy reachable");
    assert_eq!(resp.status(), 200, "upload");
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["body_bytes"], chunks * CHUNK as u64, "upload size");
    assert_eq!(echo["body_xxh3"], expected_hash.as_str(), "upload hash");
}

fn write_config(dir: &Path, upstream: std::net::SocketAddr, proxy: u16, admin: u16) -> String {
    let text = TEST_CONFIG
        .replace("{upstream}", &format!("http://{upstream}"))
        .replace("{store}", "memory: {}")
        .replacen(
            "listen: 127.0.0.1:0",
            &format!("listen: 127.0.0.1:{proxy}"),
            1,
        )
        .replacen(
            "listen: 127.0.0.1:0",
            &format!("listen: 127.0.0.1:{admin}"),
            1,
        )
        // A debug build may take a while to move 64 MiB; this is not a timing test.
        .replace("upstream: 2s", "upstream: 120s");
    assert!(text.contains(&format!(":{admin}")), "{text}");
    let path = dir.join("keygate.yaml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_with_flat_memory() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream");
    let (proxy_port, admin_port) = (free_port(), free_port());
    let config = write_config(dir.path(), upstream, proxy_port, admin_port);
    let log_path = dir.path().join("keygate.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEYGATE_")) {
        cmd.env_remove(k);
    }
    let child = cmd
        .args(["serve", "--config", &config])
        .env("KEYGATE_ROOT_TOKEN", ROOT)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start keygate");
    let mut child = ChildGuard(child);
    let pid = child.0.id();

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let up = eventually(Duration::from_secs(20), || async {
        http.get(format!("{admin}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    if !up {
        let exited = child.0.try_wait().ok().flatten();
        panic!(
            "keygate never answered /healthz (exit: {exited:?}); log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    let resp = http
        .post(format!("{admin}/v1/keys"))
        .bearer_auth(ROOT)
        .json(&json!({"label": "streaming", "scopes": ["files:write", "files:read"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();

    // Warm up (connection pools, first allocations) with 1 MiB each way.
    upload_and_check(&http, &proxy, &key, MIB / CHUNK as u64).await;
    download_and_check(&http, &proxy, &key, MIB).await;

    let rss_before = proc_kib(pid, "VmRSS");
    upload_and_check(&http, &proxy, &key, SIZE / CHUNK as u64).await;
    let rss_mid = proc_kib(pid, "VmRSS");
    download_and_check(&http, &proxy, &key, SIZE).await;
    let rss_after = proc_kib(pid, "VmRSS");
    let peak = proc_kib(pid, "VmHWM");
    println!(
        "keygate RSS: before {rss_before} KiB, after upload {rss_mid} KiB, after download \
         {rss_after} KiB, peak {peak} KiB"
    );
    let budget = 32 * 1024;
    assert!(
        rss_after < rss_before + budget,
        "RSS grew from {rss_before} KiB to {rss_after} KiB moving 2 x 64 MiB"
    );
    assert!(
        peak < rss_before + budget,
        "peak RSS {peak} KiB vs {rss_before} KiB before: a body was buffered"
    );
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "keygate exited during the test"
    );
}
