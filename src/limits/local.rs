//! `local` mode: each replica decides from its own counters (no I/O on the request path)
//! and every `sync_interval` a background task sends the store what it spent and learns
//! the total of every replica back. Between two exchanges a replica does not see what the
//! others spent: that is the documented overshoot (README, "Rate limits and credits").

use super::{Kind, LimitStore, Push};
use crate::cache::Attached;
use smallvec::SmallVec;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// Counters this process keeps at most (least recently used go first); with each counter
/// a few dozen bytes, a hostile spread of keys costs bounded memory.
const MAX_SLOTS: u64 = 1_000_000;
/// Slots due to be sent at the next exchange; a slot that finds the queue full tries again
/// on its next use.
const QUEUE: usize = 65_536;
/// A rate-limit counter stays out of the exchange while what this replica holds back of it,
/// times this and the number of replicas, is less than what its window has left: all
/// replicas together hold back at most 1/`DEFER` of a limit (README, the overshoot bound).
/// A limit far from its quota then costs no store traffic at all.
const DEFER: u64 = 20;
/// How often a replica tells the store it is there, and learns how many are.
const HEARTBEAT_MS: u64 = 1_000;
/// A replica goes on beating this long after its last limited decision: traffic that
/// pauses and comes back finds it still counted and trusted, so it defers at once instead
/// of sending every counter it spends on for `TRUSTED_BEATS` heartbeats.
const BEAT_AFTER_MS: u64 = 600_000;
/// A replica is counted this long after its last heartbeat.
const REPLICA_TTL_MS: u64 = 10_000;
/// Heartbeats a replica makes before it defers: by then every other replica that defers
/// made its first heartbeat before this one's last, so this one counts it.
const TRUSTED_BEATS: u32 = 3;
/// The admitted/refused totals (usage, not decisions) are added to a shared store this
/// often (to one only this process uses, at every exchange): with many busy keys they are
/// most of the exchange's work.
const TOTALS_MS: u64 = 10_000;
/// Routes per key whose counters are kept beside the cached key (`KeyRun`); a key used on
/// more routes finds the others' in the shared map on every request.
const ROUTES_PER_KEY: usize = 4;
/// How often counters kept beside a key are looked up in the shared map anyway: it drops
/// those it has not seen for a while (`SlotExpiry`), and another identity of the same
/// budget (after a PATCH, a rotation) must find the same slot there.
const TOUCH_MS: u64 = 60_000;

/// The counters of one request, kept inline for the usual few.
pub type Few<T> = SmallVec<[T; 4]>;

/// One counter as this process sees it, for the window it is in. What a decision reads
/// and writes comes first, in one cache line of its own (`align(64)`): with many keys in
/// use each line a request touches is a miss, and the two threads never share one by
/// accident.
#[repr(C, align(64))]
pub struct Slot {
    anchor_ms: u64,
    period_ms: u64,
    /// The quota of the window, as the last decision saw it.
    quota: AtomicU64,
    window: AtomicU64,
    /// The store's total for `window` at the last exchange (everyone's spending).
    global: AtomicU64,
    /// Spent here since the last exchange began.
    pending: AtomicU64,
    /// Sent to the store, answer not back yet.
    inflight: AtomicU64,
    /// Queued for the next exchange.
    registered: AtomicBool,
    kind: Kind,
    ttl_ms: u64,
    /// The store key without the window: `<ns>:{<tag>}:<counter id>`.
    key: String,
}

impl Slot {
    fn new(key: String, c: &super::Counter) -> Slot {
        Slot {
            anchor_ms: c.anchor_ms,
            period_ms: c.period_ms,
            quota: AtomicU64::new(0),
            window: AtomicU64::new(0),
            global: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            registered: AtomicBool::new(false),
            kind: c.kind,
            ttl_ms: c.ttl_ms(),
            key,
        }
    }

    fn window_at(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.anchor_ms) / self.period_ms
    }

    /// Move to the window `now_ms` falls in; a new window starts from nothing.
    fn enter(&self, now_ms: u64) -> u64 {
        let w = self.window_at(now_ms);
        let cur = self.window.load(Ordering::Acquire);
        if cur < w
            && self
                .window
                .compare_exchange(cur, w, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.global.store(0, Ordering::Release);
            self.pending.store(0, Ordering::Release);
        }
        w.max(cur)
    }

    /// What this process believes the window has spent.
    pub fn used(&self) -> u64 {
        self.global
            .load(Ordering::Acquire)
            .saturating_add(self.pending.load(Ordering::Acquire))
            .saturating_add(self.inflight.load(Ordering::Acquire))
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether this replica may keep what it spent to itself a while longer (`DEFER`);
    /// `share` is `DEFER` times the replicas, `None` while their number is not known.
    /// Credits are always sent: the key object shows them current within an interval.
    fn held_back(&self, share: Option<u64>) -> bool {
        let Some(share) = share else {
            return false;
        };
        if self.kind == Kind::Credits {
            return false;
        }
        let known = (self.global.load(Ordering::Acquire))
            .saturating_add(self.inflight.load(Ordering::Acquire));
        let left = self.quota.load(Ordering::Relaxed).saturating_sub(known);
        self.pending.load(Ordering::Acquire).saturating_mul(share) < left
    }
}

/// A slot is kept while idle for at least its window (and 10 minutes): one made afresh
/// starts from nothing until its first exchange, so dropping it mid-window would let a
/// long window admit again.
struct SlotExpiry;

impl moka::Expiry<u128, Arc<Slot>> for SlotExpiry {
    fn expire_after_create(
        &self,
        _: &u128,
        slot: &Arc<Slot>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(idle_for(slot))
    }

    fn expire_after_read(
        &self,
        _: &u128,
        slot: &Arc<Slot>,
        _: std::time::Instant,
        _: Option<Duration>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(idle_for(slot))
    }
}

/// How long an unused slot stays: its window, at least 10 minutes, at most 400 days
/// (credits without a refill: one endless window).
fn idle_for(slot: &Slot) -> Duration {
    let window = slot.period_ms.clamp(600_000, 400 * 86_400_000);
    Duration::from_millis(window)
}

/// The caches' keys are xxh3 hashes of ids keygate made (key ids, budgets, names from the
/// config), not of client bytes: hashing them again would only cost time.
#[derive(Clone, Default)]
struct Prehashed;

#[derive(Default)]
struct Folded(u64);

impl std::hash::BuildHasher for Prehashed {
    type Hasher = Folded;
    fn build_hasher(&self) -> Folded {
        Folded::default()
    }
}

impl std::hash::Hasher for Folded {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }
    fn write_u128(&mut self, n: u128) {
        self.0 ^= n as u64 ^ (n >> 64) as u64;
    }
}

type Slots<V> = moka::sync::Cache<u128, Arc<V>, Prehashed>;

pub struct Local {
    slots: Slots<Slot>,
    new_slots: mpsc::Sender<Arc<Slot>>,
    new_totals: mpsc::Sender<Arc<KeyRun>>,
    /// Did the last exchange reach the store?
    store_ok: Arc<AtomicBool>,
    /// `DEFER` times the replicas, 0 while not known (`Peers::share`): what `spend` needs
    /// to tell a slot due to be sent.
    share: Arc<AtomicU64>,
}

/// The receiving half, for `run_exchange`.
pub struct Joining {
    slots: mpsc::Receiver<Arc<Slot>>,
    totals: mpsc::Receiver<Arc<KeyRun>>,
    store_ok: Arc<AtomicBool>,
    share: Arc<AtomicU64>,
    /// Every slot, for the last exchange (which sends what was held back too).
    all: Slots<Slot>,
}

impl Local {
    pub fn new() -> (Local, Joining) {
        let (new_slots, slots) = mpsc::channel(QUEUE);
        let (new_totals, totals) = mpsc::channel(QUEUE);
        let store_ok = Arc::new(AtomicBool::new(true));
        let share = Arc::new(AtomicU64::new(0));
        let local = Local {
            slots: moka::sync::Cache::builder()
                .max_capacity(MAX_SLOTS)
                .expire_after(SlotExpiry)
                .build_with_hasher(Prehashed),
            new_slots,
            new_totals,
            store_ok: store_ok.clone(),
            share: share.clone(),
        };
        let all = local.slots.clone();
        (
            local,
            Joining {
                slots,
                totals,
                store_ok,
                share,
                all,
            },
        )
    }

    /// Whether the last exchange with the store worked.
    pub fn store_ok(&self) -> bool {
        self.store_ok.load(Ordering::Acquire)
    }

    /// The slot of a counter, identified by `hash`; `make` builds the store key and the
    /// counter on first sight only.
    pub fn slot(&self, hash: u128, make: impl FnOnce() -> (String, super::Counter)) -> Arc<Slot> {
        self.slots.get_with(hash, || {
            let (key, c) = make();
            Arc::new(Slot::new(key, &c))
        })
    }

    /// Enter `now_ms`'s window and say what it has spent; `quota` is its quota now.
    pub fn used(slot: &Slot, now_ms: u64, quota: impl FnOnce(u64) -> u64) -> (u64, u64) {
        let w = slot.enter(now_ms);
        slot.quota.store(quota(w), Ordering::Relaxed);
        (w, slot.used())
    }

    /// Spend `cost` on `slot`, and queue it for the exchange once what it holds is due to
    /// be sent (`Slot::held_back`): a counter far from its limit costs the exchange nothing.
    pub fn spend(&self, slot: &Arc<Slot>, cost: u64) {
        // SeqCst, with the exchange's unqueueing: either this sees the slot unqueued, or
        // the exchange sees this spend. (Reading first spares the common case a write.)
        slot.pending.fetch_add(cost, Ordering::SeqCst);
        let share = self.share.load(Ordering::Relaxed);
        if !slot.registered.load(Ordering::SeqCst)
            && !slot.held_back((share > 0).then_some(share))
            && !slot.registered.swap(true, Ordering::AcqRel)
            && self.new_slots.try_send(slot.clone()).is_err()
        {
            slot.registered.store(false, Ordering::Release);
        }
    }

    /// Look `slot` up in the shared map again (`TOUCH_MS`), putting it back if it left.
    pub fn touch(&self, hash: u128, slot: &Arc<Slot>) {
        self.slots.get_with(hash, || slot.clone());
    }

    /// The state kept beside a cached key (see `KeyRun`), made on its first limited
    /// request; `None` if something else is attached to the key.
    pub fn run<'a>(attached: &'a Attached, tenant: &str, key_id: &str) -> Option<RunRef<'a>> {
        let any = attached.get_or_init(|| Arc::new(KeyRun::new(tenant, key_id)));
        let run = any.downcast_ref::<KeyRun>()?;
        Some(RunRef {
            queue_as: QueueAs::Attached(any),
            run,
        })
    }

    /// A key's `KeyRun` made for one request (when something else is attached to it).
    pub fn own(run: &Arc<KeyRun>) -> RunRef<'_> {
        RunRef {
            queue_as: QueueAs::Own(run),
            run,
        }
    }

    /// Count one decision for the key's usage totals.
    pub fn count(&self, run: RunRef<'_>, admitted: bool) {
        let t = run.run;
        let n = if admitted { &t.admitted } else { &t.refused };
        n.fetch_add(1, Ordering::SeqCst);
        if t.registered.load(Ordering::SeqCst) || t.registered.swap(true, Ordering::AcqRel) {
            return;
        }
        let queued = (run.queue_as.shared()).is_some_and(|r| self.new_totals.try_send(r).is_ok());
        if !queued {
            t.registered.store(false, Ordering::Release);
        }
    }
}

/// What a cached key's limited requests reuse, kept beside its identity: its usage totals
/// (admitted/refused, waiting to be added in the store) and, for the first few routes it
/// is used on, that route's slots in the decision's order. A repeat request then reads no
/// shared map: every read of one (moka) is a write to a queue all threads share. What an
/// admitted request on the key's first route touches is one cache line, the first.
#[repr(C, align(64))]
pub struct KeyRun {
    admitted: AtomicU64,
    /// Queued for the exchange's totals.
    registered: AtomicBool,
    first: OnceLock<RouteRun>,
    refused: AtomicU64,
    more: [OnceLock<RouteRun>; ROUTES_PER_KEY - 1],
    tag: String,
    key_id: String,
}

const _: () = assert!(std::mem::offset_of!(KeyRun, refused) <= 64);

/// A key's `KeyRun`, with what it is shared as, to queue it for the exchange.
#[derive(Clone, Copy)]
pub struct RunRef<'a> {
    queue_as: QueueAs<'a>,
    pub run: &'a KeyRun,
}

#[derive(Clone, Copy)]
enum QueueAs<'a> {
    Attached(&'a Arc<dyn std::any::Any + Send + Sync>),
    Own(&'a Arc<KeyRun>),
}

impl QueueAs<'_> {
    fn shared(self) -> Option<Arc<KeyRun>> {
        match self {
            QueueAs::Attached(any) => any.clone().downcast::<KeyRun>().ok(),
            QueueAs::Own(run) => Some(run.clone()),
        }
    }
}

/// The slots of one route's requests by one key (inline for two: a route limit and a
/// key's own, say; more spill to the heap).
pub struct RouteRun {
    route: u64,
    touched_ms: AtomicU64,
    pub slots: SmallVec<[Arc<Slot>; 2]>,
}

impl KeyRun {
    /// A new key's: totals from nothing (they are deltas: two runs of one key add up).
    pub fn new(tenant: &str, key_id: &str) -> KeyRun {
        KeyRun {
            admitted: AtomicU64::new(0),
            registered: AtomicBool::new(false),
            first: OnceLock::new(),
            refused: AtomicU64::new(0),
            more: Default::default(),
            tag: super::tag(tenant),
            key_id: key_id.to_string(),
        }
    }

    /// The slots kept for the route `uid`, made with `make` if it is among the first few
    /// routes; `None` past those.
    pub fn route(&self, uid: u64, make: impl FnOnce() -> Few<Arc<Slot>>) -> Option<&RouteRun> {
        let mut make = Some(make);
        for cell in std::iter::once(&self.first).chain(&self.more) {
            let run = match cell.get() {
                Some(run) => run,
                None => {
                    let m = make.take()?;
                    cell.get_or_init(|| RouteRun {
                        route: uid,
                        touched_ms: AtomicU64::new(0),
                        slots: m().into_iter().collect(),
                    })
                }
            };
            if run.route == uid {
                return Some(run);
            }
        }
        None
    }
}

impl RouteRun {
    /// Whether these slots are due to be looked up in the shared map (`TOUCH_MS`); one
    /// caller in a period is told yes.
    pub fn touch_due(&self, now_ms: u64) -> bool {
        let t = self.touched_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(t) >= TOUCH_MS
            && (self.touched_ms)
                .compare_exchange(t, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// One exchange's sends, to settle when the answer is back.
struct Sent {
    slot: Arc<Slot>,
    window: u64,
    delta: u64,
}

/// What this replica knows of the others: how many exchange with the store.
struct Peers {
    id: String,
    /// `None`: the store is this process's own.
    count: Option<u64>,
    beats: u32,
    next_ms: u64,
}

impl Peers {
    fn new() -> Peers {
        let mut id = [0u8; 8];
        // Without randomness two replicas may share an id: counted as one, they would
        // defer too much, so this one does not defer at all.
        let random = getrandom::fill(&mut id).is_ok();
        Peers {
            id: format!("{:016x}", u64::from_le_bytes(id)),
            count: Some(1),
            beats: 0,
            // Never beats, so never trusted.
            next_ms: if random { 0 } else { u64::MAX },
        }
    }

    /// Tell the store this replica is there, once a `HEARTBEAT_MS`.
    async fn beat(&mut self, store: &dyn LimitStore, now_ms: u64) {
        if now_ms < self.next_ms {
            return;
        }
        self.next_ms = now_ms.saturating_add(HEARTBEAT_MS);
        match store.replicas(&self.id, REPLICA_TTL_MS).await {
            Ok(n) => {
                self.count = n.map(|n| n.max(1));
                self.beats = self.beats.saturating_add(1);
            }
            Err(e) => {
                self.beats = 0;
                tracing::warn!(error = %e, "could not count the replicas sharing rate limits");
            }
        }
    }

    /// Whether the store is this process's own (known after the first heartbeat).
    fn own_store(&self) -> bool {
        self.beats > 0 && self.count.is_none()
    }

    /// `DEFER` times the replicas, once their number can be trusted.
    fn share(&self) -> Option<u64> {
        let count = self.count?;
        (self.beats >= TRUSTED_BEATS).then(|| DEFER.saturating_mul(count))
    }
}

/// Exchange every `interval` until `stop` fires (one last exchange then, of everything).
pub async fn run_exchange(
    mut joining: Joining,
    store: Arc<dyn LimitStore>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut due: Vec<Arc<Slot>> = Vec::new();
    let mut totals: Vec<Arc<KeyRun>> = Vec::new();
    let mut peers = Peers::new();
    let mut totals_sent = 0u64;
    let mut active_ms: Option<u64> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        } || *stop.borrow();
        while let Ok(s) = joining.slots.try_recv() {
            due.push(s);
        }
        while let Ok(t) = joining.totals.try_recv() {
            totals.push(t);
        }
        if last {
            // Everything, held back or not: the others must learn what this one spent.
            due = joining.all.iter().map(|(_, s)| s).collect();
        }
        let now = crate::time::now_ms();
        if !totals.is_empty() || !due.is_empty() {
            active_ms = Some(now);
        }
        // No decisions for `BEAT_AFTER_MS` (a keygate without limits never asks): no
        // heartbeat, and the count starts over, as the others stop counting this replica.
        if active_ms.is_some_and(|t| now.saturating_sub(t) < BEAT_AFTER_MS) {
            peers.beat(&*store, now).await;
        } else {
            peers.beats = 0;
        }
        let share = if last { None } else { peers.share() };
        joining.share.store(share.unwrap_or(0), Ordering::Relaxed);
        let (mut ok, failed) = exchange(&*store, std::mem::take(&mut due), now, share).await;
        due = failed;
        let every = if peers.own_store() { 0 } else { TOTALS_MS };
        if last || now >= totals_sent.saturating_add(every) {
            totals_sent = now;
            ok &= add_totals(&*store, &mut totals).await;
        }
        joining.store_ok.store(ok, Ordering::Release);
        if last {
            return;
        }
    }
}

/// Send what each queued slot spent since the last exchange; the answer is every
/// replica's total. A slot is queued only once what it holds is due (`Local::spend`): one
/// that spent nothing here stays out, as its total can only be behind the store's (a
/// window's count only grows), which matters only once this replica spends on it again;
/// one whose spending is small next to what its window has left stays out too
/// (`Slot::held_back`). With many keys far from their limits this sends next to nothing.
/// Returns whether all went through, and the slots to send again.
async fn exchange(
    store: &dyn LimitStore,
    due: Vec<Arc<Slot>>,
    now_ms: u64,
    share: Option<u64>,
) -> (bool, Vec<Arc<Slot>>) {
    let mut sent = Vec::new();
    let mut pushes = Vec::new();
    for s in due {
        // Unqueue first: a spend from here on queues the slot again (see `spend`).
        s.registered.store(false, Ordering::SeqCst);
        if s.pending.load(Ordering::SeqCst) == 0 {
            continue;
        }
        let window = s.enter(now_ms);
        if s.held_back(share) {
            continue;
        }
        let delta = s.pending.swap(0, Ordering::AcqRel);
        s.inflight.fetch_add(delta, Ordering::AcqRel);
        pushes.push(Push {
            key: format!("{}:{window}", s.key),
            delta,
            ttl_ms: s.ttl_ms,
        });
        sent.push(Sent {
            slot: s,
            window,
            delta,
        });
    }
    if pushes.is_empty() {
        return (true, Vec::new());
    }
    let totals = store.exchange_each(&pushes).await;
    let mut failed = Vec::new();
    let mut errors = 0;
    for (s, total) in sent.iter().zip(totals) {
        let same_window = s.slot.window.load(Ordering::Acquire) == s.window;
        match total {
            // The total first, then the in-flight part it includes: `used` never dips.
            Some(total) if same_window => {
                s.slot.global.store(total, Ordering::Release);
                s.slot.inflight.fetch_sub(s.delta, Ordering::AcqRel);
            }
            Some(_) => {
                s.slot.inflight.fetch_sub(s.delta, Ordering::AcqRel);
            }
            // Not applied: send it again next time (unless its window is over).
            None => {
                errors += 1;
                if same_window {
                    s.slot.pending.fetch_add(s.delta, Ordering::AcqRel);
                    s.slot.registered.store(true, Ordering::SeqCst);
                    failed.push(s.slot.clone());
                }
                s.slot.inflight.fetch_sub(s.delta, Ordering::AcqRel);
            }
        }
    }
    if errors > 0 {
        tracing::warn!(
            failed = errors,
            counters = sent.len(),
            "could not exchange rate-limit counts with the store"
        );
    }
    (errors == 0, failed)
}

/// Add the keys' admitted/refused totals; what could not be sent stays for next time.
async fn add_totals(store: &dyn LimitStore, totals: &mut Vec<Arc<KeyRun>>) -> bool {
    let mut adds = Vec::new();
    let mut taken = Vec::new();
    // One pass (a busy replica holds a total for every key in use). Idle totals leave the
    // list; the next decision registers them again. Leave, then look again: a count that
    // saw `registered` still set stays here.
    totals.retain(|t| {
        let a = t.admitted.swap(0, Ordering::AcqRel);
        let r = t.refused.swap(0, Ordering::AcqRel);
        if a + r > 0 {
            adds.push((t.tag.clone(), t.key_id.clone(), a, r));
            taken.push((t.clone(), a, r));
            return true;
        }
        t.registered.store(false, Ordering::SeqCst);
        let counted = t.admitted.load(Ordering::SeqCst) + t.refused.load(Ordering::SeqCst) > 0;
        if counted {
            t.registered.store(true, Ordering::Release);
        }
        counted
    });
    if adds.is_empty() {
        return true;
    }
    match store.add_totals(&adds).await {
        Ok(()) => true,
        Err(e) => {
            for (t, a, r) in taken {
                t.admitted.fetch_add(a, Ordering::AcqRel);
                t.refused.fetch_add(r, Ordering::AcqRel);
            }
            tracing::warn!(error = %e, "could not add usage totals");
            false
        }
    }
}
