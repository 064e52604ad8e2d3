//! Criterion benches of the proxy's hot path: cache-hit verification (parse, checksum,
//! digest, cache get, record and scope checks) and route matching over 1,000 routes.
//! Run: `cargo bench --bench hot_path`. Results are summarised in benches/RESULTS.md.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "test and bench code: the request-path rules are for src/"
)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use keygate::auth::Verifier;
use keygate::cache::{KeyCache, Reader};
use keygate::config::Config;
use keygate::key::{self, Environment, KeyHasher, KeyType, Prefixes};
use keygate::metrics::Metrics;
use keygate::proxy::Proxy;
use keygate::snapshot::{Live, Snapshot};
use keygate::store::{memory::MemoryStore, KeyRecord, KeyStore};
use std::sync::Arc;
use std::time::Duration;

const CONFIG: &str = r#"
proxy: { listen: "127.0.0.1:0", upstream: "http://127.0.0.1:1" }
admin: { listen: "127.0.0.1:0" }
store: { memory: {} }
routes:
  - { name: users-read, methods: [GET], path: "/users/**", scopes: ["users:read"] }
"#;

fn routes_config(n: usize) -> String {
    let mut s = String::from(
        "proxy: { listen: \"127.0.0.1:0\", upstream: \"http://127.0.0.1:1\" }\nadmin: { listen: \"127.0.0.1:0\" }\nstore: { memory: {} }\nroutes:\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "  - {{ name: r{i}, methods: [GET, POST], path: \"/svc{i}/items/*/detail\", scopes: [\"svc{i}:read\"] }}\n"
        ));
    }
    s
}

fn verification(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let config = Config::from_yaml(CONFIG, "bench", &[("X", "Y")]).unwrap();
    let prefixes = Prefixes::default();
    let new = key::generate(&prefixes, KeyType::Secret, Environment::Live).unwrap();

    for (label, pepper) in [
        ("sha256", None),
        ("hmac-pepper", Some(&b"pepper-pepper"[..])),
    ] {
        let hasher = KeyHasher::new(pepper);
        let store = Arc::new(MemoryStore::new());
        let record = KeyRecord {
            id: "01900000-0000-7000-8000-000000000000".into(),
            tenant: "bench".into(),
            name: "bench".into(),
            key_type: KeyType::Secret,
            environment: Environment::Live,
            prefix: new.display_prefix(),
            last_four: new.last_four(),
            scopes: vec!["orders:read".into(), "users:read".into()],
            created_at: 1,
            last_used_at: None,
            expires_at: None,
            revoked_at: None,
            successor_id: None,
            digest: hasher.digest(&new.text),
            limits: Default::default(),
            plain_sha256: false,
        };
        rt.block_on(store.insert(&record)).unwrap();
        let metrics = Arc::new(Metrics::new());
        let live = Live::new(Snapshot::new(&config, &metrics));
        let verifier = Verifier {
            cache: Arc::new(KeyCache::new(1_000_000)),
            hasher: hasher.clone(),
            prefixes: prefixes.clone(),
            legacy: Default::default(),
        };
        let reader: Reader = store;
        let (usage, _queue) = keygate::usage::UsageRecorder::new();
        let (limiter, _joining, _) = keygate::limits::Limiter::for_store(&*reader, metrics.clone());
        let proxy = Proxy::new(
            &config,
            live.clone(),
            verifier,
            reader.clone(),
            metrics,
            usage,
            Arc::new(limiter),
        )
        .unwrap();
        let rules = live.load().auth;
        let policy = config.live.policy.clone();
        let (_, route) = policy.find(&http::Method::GET, "/users/1").unwrap();
        // Warm the cache.
        rt.block_on(proxy.check_token(&new.text, route, rules, &reader, &mut None))
            .unwrap();

        c.bench_function(&format!("verify/cache_hit/{label}"), |b| {
            b.to_async(&rt).iter(|| async {
                black_box(
                    proxy
                        .check_token(black_box(&new.text), route, rules, &reader, &mut None)
                        .await,
                )
                .unwrap();
            })
        });
        c.bench_function(&format!("verify/digest_only/{label}"), |b| {
            b.iter(|| black_box(hasher.digest(black_box(&new.text))))
        });
    }
    c.bench_function("verify/parse_checksum", |b| {
        b.iter(|| {
            key::parse(&prefixes, black_box(&new.text))
                .unwrap()
                .prefix_len
        })
    });
    let junk = format!("{}x", &new.text[..new.text.len() - 1]);
    c.bench_function("verify/reject_bad_checksum", |b| {
        b.iter(|| key::parse(&prefixes, black_box(&junk)).is_err())
    });
}

fn route_matching(c: &mut Criterion) {
    let text = routes_config(1000);
    let config = Config::from_yaml(&text, "bench", &[("X", "Y")]).unwrap();
    let policy = config.live.policy.clone();
    let get = http::Method::GET;
    c.bench_function("routes/1000/first", |b| {
        b.iter(|| {
            policy
                .find(&get, black_box("/svc0/items/42/detail"))
                .is_some()
        })
    });
    c.bench_function("routes/1000/middle", |b| {
        b.iter(|| {
            policy
                .find(&get, black_box("/svc500/items/42/detail"))
                .is_some()
        })
    });
    c.bench_function("routes/1000/last", |b| {
        b.iter(|| {
            policy
                .find(&get, black_box("/svc999/items/42/detail"))
                .is_some()
        })
    });
    c.bench_function("routes/1000/miss", |b| {
        b.iter(|| policy.find(&get, black_box("/nothing/here")).is_none())
    });
    c.bench_function("routes/normalize/clean", |b| {
        b.iter(|| keygate::policy::path::normalize(black_box("/svc999/items/42/detail")).is_ok())
    });
    c.bench_function("routes/normalize/dirty", |b| {
        b.iter(|| {
            keygate::policy::path::normalize(black_box("/svc999//items/./x/../42/%7edetail"))
                .is_ok()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = verification, route_matching
}
criterion_main!(benches);
