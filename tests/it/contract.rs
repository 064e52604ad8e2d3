//! The store contract: the same behaviour cases, run against the memory store here and
//! against a real Redis in `redis_store.rs`.
use keygate::key::{self, Environment, KeyType};
use keygate::store::{KeyRecord, KeyStore, KeyUpdate, PageRequest, StoreError};

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
