//! The store contract: the same behaviour cases, run against the memory store here and
//! against a real Redis in `redis_store.rs`.
use keygate::key::{self, Environment, KeyType};
use keygate::store::{
    Credits, KeyLimits, KeyRecord, KeyStore, KeyUpdate, PageRequest, RateLimit, Refill, StoreError,
};

pub fn record(tenant: &str, created_at: u64) -> KeyRecord {
    let id = uuid::Uuid::now_v7().to_string();
    let k = key::generate(
        &key::Prefixes::default(),
        KeyType::Secret,
        Environment::Live,
    )
    .expect("os rng");
    KeyRecord {
        id,
        tenant: tenant.into(),
        name: "n".into(),
        key_type: KeyType::Secret,
        environment: Environment::Live,
        prefix: k.display_prefix(),
        last_four: k.last_four(),
        scopes: vec!["users:read".into(), "*".into()],
        created_at,
        last_used_at: None,
        expires_at: Some(created_at + 1000),
        revoked_at: None,
        successor_id: None,
        digest: key::sha256(k.text.as_bytes()),
        limits: Default::default(),
        plain_sha256: false,
    }
}

pub async fn run_all(store: &dyn KeyStore) {
    update_and_rotate(store).await;
    touch_records_last_use(store).await;
    insert_and_read_back(store).await;
    tenants_are_isolated(store).await;
    revoke_is_idempotent(store).await;
    list_pages_newest_first(store).await;
    update_refuses_a_revoked_key(store).await;
    update_is_idempotent(store).await;
    rotate_refuses_a_key_with_a_successor(store).await;
    concurrent_rotations_make_one_successor(store).await;
    limits_round_trip(store).await;
    update_sets_replaces_and_removes_limits(store).await;
    update_of_limits_refuses_a_revoked_key(store).await;
    a_hash_import_keeps_its_mark_and_its_digest(store).await;
}

/// A key imported by SHA-256 reads back marked as such by digest, id and list, and a
/// second record with its digest is refused (create-if-absent), the first unchanged.
async fn a_hash_import_keeps_its_mark_and_its_digest(store: &dyn KeyStore) {
    let r = KeyRecord {
        plain_sha256: true,
        prefix: String::new(),
        last_four: String::new(),
        ..record("t-import", 1_700_000_000_000)
    };
    store.insert(&r).await.unwrap();
    assert_eq!(store.by_digest(&r.digest).await.unwrap().as_ref(), Some(&r));
    assert_eq!(
        store.by_id("t-import", &r.id).await.unwrap().as_ref(),
        Some(&r)
    );
    let page = PageRequest {
        limit: 10,
        cursor: None,
    };
    assert_eq!(
        store.list("t-import", &page).await.unwrap().items,
        vec![r.clone()]
    );
    let again = KeyRecord {
        id: uuid::Uuid::now_v7().to_string(),
        name: "again".into(),
        plain_sha256: false,
        ..r.clone()
    };
    assert!(matches!(
        store.insert(&again).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.by_digest(&r.digest).await.unwrap().as_ref(), Some(&r));
}

/// Two rate limits, credits with a refill, and another key's budget.
pub fn some_limits() -> KeyLimits {
    KeyLimits {
        ratelimits: vec![
            RateLimit {
                name: "per-second".into(),
                limit: 10,
                duration_ms: 1_000,
            },
            RateLimit {
                name: "per-day".into(),
                limit: 50_000,
                duration_ms: 86_400_000,
            },
        ],
        credits: Some(Credits {
            remaining: 1_000,
            set_at: 1_700_000_000_000,
            refill: Some(Refill {
                amount: 500,
                interval_ms: 3_600_000,
            }),
        }),
        budget: Some("0193aaaa-bbbb-7ccc-8ddd-eeeeffff0000".into()),
    }
}

async fn insert_and_read_back(store: &dyn KeyStore) {
    let r = record("t-read", 1_700_000_000_000);
    store.insert(&r).await.unwrap();
    assert_eq!(store.by_digest(&r.digest).await.unwrap(), Some(r.clone()));
    assert_eq!(store.by_id("t-read", &r.id).await.unwrap(), Some(r.clone()));
    assert!(matches!(store.insert(&r).await, Err(StoreError::Conflict)));
    assert_eq!(store.by_digest(&[7u8; 32]).await.unwrap(), None);
}

async fn update_and_rotate(store: &dyn KeyStore) {
    let old = record("t-rot", 1_700_000_000_000);
    store.insert(&old).await.unwrap();
    let change = KeyUpdate {
        name: Some("renamed".into()),
        scopes: Some(vec!["a:b".into()]),
        ..KeyUpdate::default()
    };
    let updated = store
        .update("t-rot", &old.id, &change, 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.scopes.clone()),
        ("renamed", vec!["a:b".to_string()])
    );
    assert_eq!(
        store.by_digest(&old.digest).await.unwrap().unwrap().scopes,
        vec!["a:b".to_string()]
    );
    assert_eq!(
        store.update("t-other", &old.id, &change, 1).await.unwrap(),
        None
    );
    let only_name = KeyUpdate {
        name: Some("again".into()),
        scopes: None,
        ..KeyUpdate::default()
    };
    let r = store
        .update("t-rot", &old.id, &only_name, 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.name.as_str(), r.scopes.len()), ("again", 1));

    let mut new = record("t-rot", 1_700_000_000_001);
    new.expires_at = None;
    let now = 1_700_000_000_500;
    let rotated = store
        .rotate("t-rot", &old.id, &new, now + 100, now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rotated.revoked_at, Some(now + 100));
    assert_eq!(rotated.successor_id.as_deref(), Some(new.id.as_str()));
    assert_eq!(
        store.by_digest(&new.digest).await.unwrap(),
        Some(new.clone())
    );
    let ids: Vec<String> = store
        .list(
            "t-rot",
            &PageRequest {
                limit: 10,
                cursor: None,
            },
        )
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec![new.id.clone(), old.id.clone()]);
    // Revoking during the grace period brings the revocation forward.
    let revoked = store
        .revoke("t-rot", &old.id, now + 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(now + 10));
    // A revoked key cannot be rotated; neither can another tenant's.
    let newer = record("t-rot", 1_700_000_000_002);
    assert!(matches!(
        store
            .rotate("t-rot", &old.id, &newer, now + 1000, now + 20)
            .await,
        Err(StoreError::NotRotatable)
    ));
    assert_eq!(
        store
            .rotate("t-x", &new.id, &newer, now, now)
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.by_digest(&newer.digest).await.unwrap(), None);
    // An expired key cannot be rotated (record() expires 1000 ms after creation).
    let expired = record("t-rot", 1_700_000_000_000);
    store.insert(&expired).await.unwrap();
    assert!(matches!(
        store
            .rotate("t-rot", &expired.id, &newer, now + 5000, 1_700_000_002_000)
            .await,
        Err(StoreError::NotRotatable)
    ));
    assert_eq!(store.by_digest(&newer.digest).await.unwrap(), None);
}

async fn touch_records_last_use(store: &dyn KeyStore) {
    let r = record("t-touch", 1_700_000_000_000);
    store.insert(&r).await.unwrap();
    store
        .touch(&[(r.digest, 5_000), ([9u8; 32], 6_000)])
        .await
        .unwrap();
    assert_eq!(
        store
            .by_digest(&r.digest)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        Some(5_000)
    );
    store.touch(&[(r.digest, 4_000)]).await.unwrap();
    assert_eq!(
        store
            .by_digest(&r.digest)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        Some(5_000)
    );
    assert_eq!(store.by_digest(&[9u8; 32]).await.unwrap(), None);
    store.touch(&[]).await.unwrap();
}

async fn tenants_are_isolated(store: &dyn KeyStore) {
    let r = record("t-a", 1_700_000_000_000);
    store.insert(&r).await.unwrap();
    assert_eq!(store.by_id("t-b", &r.id).await.unwrap(), None);
    assert_eq!(store.revoke("t-b", &r.id, 5).await.unwrap(), None);
    assert!(store
        .list(
            "t-b",
            &PageRequest {
                limit: 10,
                cursor: None
            }
        )
        .await
        .unwrap()
        .items
        .is_empty());
    assert_eq!(store.by_id("t-a", "not-an-id").await.unwrap(), None);
}

async fn revoke_is_idempotent(store: &dyn KeyStore) {
    let r = record("t-rev", 1_700_000_000_000);
    store.insert(&r).await.unwrap();
    let first = store.revoke("t-rev", &r.id, 111).await.unwrap().unwrap();
    assert_eq!(first.revoked_at, Some(111));
    let second = store.revoke("t-rev", &r.id, 222).await.unwrap().unwrap();
    assert_eq!(second.revoked_at, Some(111));
    let read = store.by_digest(&r.digest).await.unwrap().unwrap();
    assert_eq!(read.revoked_at, Some(111));
}

async fn list_pages_newest_first(store: &dyn KeyStore) {
    let mut made = Vec::new();
    for i in 0..7 {
        let r = record("t-list", 1_700_000_000_000 + i);
        store.insert(&r).await.unwrap();
        made.push(r.id);
    }
    made.reverse();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(
                "t-list",
                &PageRequest {
                    limit: 3,
                    cursor: cursor.clone(),
                },
            )
            .await
            .unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.iter().map(|r| r.id.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, made);
    assert!(matches!(
        store
            .list(
                "t-list",
                &PageRequest {
                    limit: 3,
                    cursor: Some("garbage".into())
                }
            )
            .await,
        Err(StoreError::BadCursor)
    ));
}

async fn update_refuses_a_revoked_key(store: &dyn KeyStore) {
    let r = record("t-upd", 1_700_000_000_000);
    store.insert(&r).await.unwrap();
    store.revoke("t-upd", &r.id, 500).await.unwrap().unwrap();
    let before = store.by_digest(&r.digest).await.unwrap();
    let change = KeyUpdate {
        name: Some("after".into()),
        scopes: Some(vec!["x:y".into()]),
        ..KeyUpdate::default()
    };
    for now in [500, 501] {
        assert!(
            matches!(
                store.update("t-upd", &r.id, &change, now).await,
                Err(StoreError::Revoked)
            ),
            "update at {now} of a key revoked at 500"
        );
        assert_eq!(store.by_digest(&r.digest).await.unwrap(), before);
    }
    // Before its revocation (as in a rotation's grace period) it still changes.
    let early = store
        .update("t-upd", &r.id, &change, 499)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(early.name, "after");
    // Another tenant's key is not found, revoked or not.
    assert_eq!(
        store.update("t-nope", &r.id, &change, 501).await.unwrap(),
        None
    );
}

async fn update_is_idempotent(store: &dyn KeyStore) {
    let r = record("t-idem", 1_700_000_000_000);
    store.insert(&r).await.unwrap();
    let change = KeyUpdate {
        name: Some("same".into()),
        scopes: Some(vec!["a:b".into(), "c".into()]),
        ..KeyUpdate::default()
    };
    let first = store.update("t-idem", &r.id, &change, 1).await.unwrap();
    let second = store.update("t-idem", &r.id, &change, 2).await.unwrap();
    assert!(first.is_some());
    assert_eq!(first, second);
    assert_eq!(store.by_digest(&r.digest).await.unwrap(), second);
}

async fn rotate_refuses_a_key_with_a_successor(store: &dyn KeyStore) {
    let old = record("t-fork", 1_700_000_000_000);
    store.insert(&old).await.unwrap();
    let now = 1_700_000_000_100;
    let first = record("t-fork", now);
    let rotated = store
        .rotate("t-fork", &old.id, &first, now + 60_000, now)
        .await
        .unwrap()
        .unwrap();
    let second = record("t-fork", now + 1);
    assert!(matches!(
        store
            .rotate("t-fork", &old.id, &second, now + 1, now + 1)
            .await,
        Err(StoreError::AlreadyRotated)
    ));
    // Nothing changed: no second key, the old one still links to the first successor
    // and keeps its revocation time.
    assert_eq!(store.by_digest(&second.digest).await.unwrap(), None);
    assert_eq!(store.by_id("t-fork", &second.id).await.unwrap(), None);
    assert_eq!(store.by_digest(&old.digest).await.unwrap(), Some(rotated));
    assert_eq!(
        tenant_ids(store, "t-fork").await,
        vec![first.id.clone(), old.id.clone()]
    );
    // The successor itself may be rotated.
    assert!(store
        .rotate("t-fork", &first.id, &second, now + 1, now + 1)
        .await
        .unwrap()
        .is_some());
}

async fn concurrent_rotations_make_one_successor(store: &dyn KeyStore) {
    let old = record("t-race", 1_700_000_000_000);
    store.insert(&old).await.unwrap();
    let now = 1_700_000_000_100;
    let news: Vec<KeyRecord> = (0..16).map(|i| record("t-race", now + i)).collect();
    let results = futures_util::future::join_all(
        news.iter()
            .map(|n| store.rotate("t-race", &old.id, n, now + 60_000, now)),
    )
    .await;
    let mut winners = Vec::new();
    for (n, r) in news.iter().zip(results) {
        match r {
            Ok(Some(_)) => winners.push(n.id.clone()),
            Err(StoreError::AlreadyRotated) => {}
            other => panic!("a concurrent rotation answered {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let ids = tenant_ids(store, "t-race").await;
    assert_eq!(ids, vec![winners[0].clone(), old.id.clone()]);
    let now_old = store.by_id("t-race", &old.id).await.unwrap().unwrap();
    assert_eq!(now_old.successor_id.as_ref(), Some(&winners[0]));
}

async fn limits_round_trip(store: &dyn KeyStore) {
    let mut r = record("t-lim", 1_700_000_000_000);
    r.limits = some_limits();
    store.insert(&r).await.unwrap();
    assert_eq!(store.by_digest(&r.digest).await.unwrap(), Some(r.clone()));
    let by_id = store.by_id("t-lim", &r.id).await.unwrap().unwrap();
    assert_eq!(by_id.limits, some_limits());
    // Credits alone, no refill, no budget; and a key without limits next to them.
    let mut credits_only = record("t-lim", 1_700_000_000_001);
    credits_only.limits.credits = Some(Credits {
        remaining: 3,
        set_at: 5,
        refill: None,
    });
    store.insert(&credits_only).await.unwrap();
    let plain = record("t-lim", 1_700_000_000_002);
    store.insert(&plain).await.unwrap();
    let listed = store
        .list(
            "t-lim",
            &PageRequest {
                limit: 10,
                cursor: None,
            },
        )
        .await
        .unwrap()
        .items;
    assert_eq!(listed, vec![plain.clone(), credits_only.clone(), r.clone()]);
    assert!(listed[0].limits.is_empty() && listed[0].limits.budget.is_none());
    // A rotation stores the new key's limits as given (the shared budget included).
    let mut new = record("t-lim", 1_700_000_000_003);
    new.limits = KeyLimits {
        budget: Some(r.id.clone()),
        ..some_limits()
    };
    let now = 1_700_000_000_100;
    let old = store
        .rotate("t-lim", &r.id, &new, now + 60_000, now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.limits, some_limits());
    assert_eq!(
        store.by_digest(&new.digest).await.unwrap(),
        Some(new.clone())
    );
    assert_eq!(
        store.by_id("t-lim", &new.id).await.unwrap().unwrap().limits,
        new.limits
    );
}

async fn update_sets_replaces_and_removes_limits(store: &dyn KeyStore) {
    let r = record("t-limupd", 1_700_000_000_000);
    store.insert(&r).await.unwrap();
    let update = |change: KeyUpdate| update_twice(store, &r, change);
    let limits = some_limits();
    // Set both.
    let set = update(KeyUpdate {
        ratelimits: Some(limits.ratelimits.clone()),
        credits: Some(limits.credits.clone()),
        ..KeyUpdate::default()
    })
    .await;
    assert_eq!(set.limits.ratelimits, limits.ratelimits);
    assert_eq!(set.limits.credits, limits.credits);
    assert_eq!(set.limits.budget, None);
    assert_eq!(
        (set.name.as_str(), set.scopes.clone()),
        ("n", r.scopes.clone())
    );
    // Replace the rate limits only: the credits stay; with a name change in the same step.
    let one = vec![RateLimit {
        name: "burst".into(),
        limit: 3,
        duration_ms: 100,
    }];
    let replaced = update(KeyUpdate {
        name: Some("limited".into()),
        ratelimits: Some(one.clone()),
        ..KeyUpdate::default()
    })
    .await;
    assert_eq!(replaced.name, "limited");
    assert_eq!(replaced.limits.ratelimits, one);
    assert_eq!(replaced.limits.credits, limits.credits);
    // New credits (a new set_at): the rate limits stay.
    let fresh = Credits {
        remaining: 7,
        set_at: 1_700_000_009_000,
        refill: None,
    };
    let recredited = update(KeyUpdate {
        credits: Some(Some(fresh.clone())),
        ..KeyUpdate::default()
    })
    .await;
    assert_eq!(recredited.limits.credits, Some(fresh));
    assert_eq!(recredited.limits.ratelimits, one);
    // Remove the credits (Some(None)), then the rate limits (an empty list).
    let uncredited = update(KeyUpdate {
        credits: Some(None),
        ..KeyUpdate::default()
    })
    .await;
    assert_eq!(uncredited.limits.credits, None);
    assert_eq!(uncredited.limits.ratelimits, one);
    let unlimited = update(KeyUpdate {
        ratelimits: Some(Vec::new()),
        ..KeyUpdate::default()
    })
    .await;
    assert_eq!(unlimited.limits, KeyLimits::default());
    // Back where it started, but for the name.
    assert_eq!(
        unlimited,
        KeyRecord {
            name: "limited".into(),
            ..r.clone()
        }
    );
    // Another tenant's key is not found.
    let change = KeyUpdate {
        credits: Some(Some(Credits {
            remaining: 1,
            set_at: 1,
            refill: None,
        })),
        ..KeyUpdate::default()
    };
    assert_eq!(
        store.update("t-other", &r.id, &change, 3).await.unwrap(),
        None
    );
    assert_eq!(store.by_digest(&r.digest).await.unwrap(), Some(unlimited));
}

/// Apply `change` to `r` twice: both answers and the record read back are the same.
async fn update_twice(store: &dyn KeyStore, r: &KeyRecord, change: KeyUpdate) -> KeyRecord {
    let once = store.update(&r.tenant, &r.id, &change, 1).await.unwrap();
    let twice = store.update(&r.tenant, &r.id, &change, 2).await.unwrap();
    assert_eq!(once, twice, "{change:?} applied twice");
    let read = store.by_digest(&r.digest).await.unwrap();
    assert_eq!(read, twice, "{change:?} as read back");
    read.expect("the key exists")
}

async fn update_of_limits_refuses_a_revoked_key(store: &dyn KeyStore) {
    let mut r = record("t-limrev", 1_700_000_000_000);
    r.limits = some_limits();
    store.insert(&r).await.unwrap();
    store.revoke("t-limrev", &r.id, 500).await.unwrap().unwrap();
    let before = store.by_digest(&r.digest).await.unwrap();
    let changes = [
        KeyUpdate {
            ratelimits: Some(Vec::new()),
            ..KeyUpdate::default()
        },
        KeyUpdate {
            credits: Some(None),
            ..KeyUpdate::default()
        },
        KeyUpdate {
            ratelimits: Some(vec![RateLimit {
                name: "x".into(),
                limit: 1,
                duration_ms: 1,
            }]),
            credits: Some(Some(Credits {
                remaining: 1,
                set_at: 501,
                refill: None,
            })),
            ..KeyUpdate::default()
        },
    ];
    for change in &changes {
        assert!(
            matches!(
                store.update("t-limrev", &r.id, change, 501).await,
                Err(StoreError::Revoked)
            ),
            "{change:?} of a revoked key"
        );
        assert_eq!(store.by_digest(&r.digest).await.unwrap(), before);
    }
}

/// A tenant's key ids, newest first.
async fn tenant_ids(store: &dyn KeyStore, tenant: &str) -> Vec<String> {
    let page = PageRequest {
        limit: 100,
        cursor: None,
    };
    let items = store.list(tenant, &page).await.unwrap().items;
    items.into_iter().map(|r| r.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_keeps_the_contract() {
    run_all(&keygate::store::memory::MemoryStore::new()).await;
}
