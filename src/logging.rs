//! Process logs (the access log among them): formatted where they happen, queued, and
//! written to stderr by a thread of their own, so a request never waits on a pipe.
//!
//! A proxy worker collects its lines in a per-thread batch (no allocation, no wake-up per
//! line) handed to the writer when full or on the worker's timer; other threads queue
//! each line. Not `tracing-appender`'s non-blocking writer: its thread blocks on the
//! queue, so under load every access line woke it (a futex call) and was written alone
//! (a `write` call), most of the access log's cost in the load bench.
//!
//! Access lines (`access`) skip `tracing`'s formatter, which cost 14,000 instructions per
//! request (callgrind), a third of a cache-hit request: they are written straight into
//! the batch, in the very shape `tracing`'s text or JSON formatter gives, and follow its
//! filter (target `keygate::access`, level info).

use std::cell::RefCell;
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// Batches (or single lines) waiting for the writer before new ones are dropped and
/// counted: at most this many times `BATCH_BYTES`, however slow stderr's reader is.
const QUEUE: usize = 64;

/// A worker hands its batch over at this size; `flush_this_thread` does it earlier.
const BATCH_BYTES: usize = 32 * 1024;

/// How often a proxy worker hands over a batch that is not full (`flush_every`).
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// How long shutdown waits for the queue to be written (stderr may be stuck).
const FINAL_WRITE: Duration = Duration::from_secs(2);

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How access lines are written: set once by `init` (off before, as in tests that run
/// keygate in process).
static ACCESS: AtomicU8 = AtomicU8::new(OFF);
const OFF: u8 = 0;
const TEXT: u8 = 1;
const JSON: u8 = 2;

/// The queue, for access lines of a thread that does not batch.
static QUEUE_TX: OnceLock<SyncSender<Msg>> = OnceLock::new();

thread_local! {
    /// `Some` on a thread that batches its lines (a proxy worker), else `None`.
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

enum Msg {
    /// Whole lines, and how many (counted as dropped if they cannot be written).
    Bytes(Vec<u8>, u64),
    /// The last message: everything sent before it has been written.
    Stop,
}

/// Keeps the writer thread; dropping it writes what is queued (bounded wait) and stops it.
#[must_use = "dropping the guard stops the log writer"]
pub struct Logging {
    tx: SyncSender<Msg>,
    stop: Arc<AtomicBool>,
    done: Receiver<()>,
}

/// Installs the global subscriber. Filter: `KEYGATE_LOG`, else `RUST_LOG`, else `info`.
/// Format: `KEYGATE_LOG_FORMAT=json`, else text (coloured on a terminal).
pub fn init() -> Logging {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (queue, logging) = start(std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(queue)
        .with_ansi(ansi);
    let json = std::env::var("KEYGATE_LOG_FORMAT").as_deref() == Ok("json");
    if json {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }
    let access = tracing::enabled!(target: "keygate::access", tracing::Level::INFO);
    let _ = QUEUE_TX.set(logging.tx.clone());
    ACCESS.store(
        match (access, json) {
            (false, _) => OFF,
            (true, false) => TEXT,
            (true, true) => JSON,
        },
        Ordering::Relaxed,
    );
    logging
}

/// One access-log line: what the proxy knows once it has answered (never the path).
pub struct Access<'a> {
    pub method: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub decision: &'a str,
    pub key_id: &'a str,
    pub tenant: &'a str,
    pub peer: IpAddr,
    pub duration_us: u64,
}

/// Whether `access` writes anything (the log filter lets `keygate::access` through).
pub fn access_enabled() -> bool {
    ACCESS.load(Ordering::Relaxed) != OFF
}

/// Writes an access line into this thread's batch (or queues it alone elsewhere).
pub fn access(line: &Access) {
    let format = ACCESS.load(Ordering::Relaxed);
    if format == OFF {
        return;
    }
    let Some(tx) = QUEUE_TX.get() else {
        return;
    };
    let at = crate::time::now_us();
    let batched = BATCH.try_with(|b| match b.try_borrow_mut().as_deref_mut() {
        Ok(Some(batch)) => {
            batch.start(tx);
            format_access(&mut batch.bytes, format, at, line);
            batch.added();
            true
        }
        _ => false,
    });
    if batched != Ok(true) {
        let mut bytes = Vec::with_capacity(256);
        format_access(&mut bytes, format, at, line);
        send(tx, bytes, 1);
    }
}

/// `line` as `tracing`'s text formatter (`&str` fields quoted, others as `Display`) or its
/// JSON formatter with `flatten_event` would write it. Written by hand: `write!` and
/// `Debug` escaping cost most of the line (a few thousand instructions).
fn format_access(out: &mut Vec<u8>, format: u8, at_us: u64, a: &Access) {
    let json = format == JSON;
    let num =
        |out: &mut Vec<u8>, n: u64| out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out, at_us);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"method\":");
        quoted(out, a.method, json);
    } else {
        timestamp(out, at_us);
        out.extend_from_slice(b"  INFO keygate::access: method=");
        out.extend_from_slice(a.method.as_bytes());
    }
    let key = |out: &mut Vec<u8>, name: &str| {
        out.extend_from_slice(if json { b",\"" } else { b" " });
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(if json { b"\":" } else { b"=" });
    };
    key(out, "route");
    quoted(out, a.route, json);
    key(out, "status");
    num(out, u64::from(a.status));
    key(out, "decision");
    quoted(out, a.decision, json);
    key(out, "key_id");
    quoted(out, a.key_id, json);
    key(out, "tenant");
    quoted(out, a.tenant, json);
    key(out, "peer");
    peer(out, a.peer, json);
    key(out, "duration_us");
    num(out, a.duration_us);
    out.extend_from_slice(if json {
        b",\"target\":\"keygate::access\"}\n"
    } else {
        b"\n"
    });
}

/// A quoted string, escaped as `Debug` (text) or JSON would; the fields are nearly always
/// plain (ids, names, codes), which both write the same way.
fn quoted(out: &mut Vec<u8>, s: &str, json: bool) {
    let plain = s
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if json {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// The peer address, a string in JSON.
fn peer(out: &mut Vec<u8>, ip: IpAddr, json: bool) {
    if json {
        out.push(b'"');
    }
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
    if json {
        out.push(b'"');
    }
}

thread_local! {
    /// The second last formatted on this thread, as `2026-06-12T14:24:37`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `2026-06-12T14:24:37.123456Z` (the date and time formatted once a second per thread).
fn timestamp(out: &mut Vec<u8>, at_us: u64) {
    let (secs, micros) = (at_us / 1_000_000, at_us % 1_000_000);
    let cached = SECOND.with(|c| {
        let Ok(mut c) = c.try_borrow_mut() else {
            return false;
        };
        if c.0 != secs {
            let whole = crate::time::rfc3339(secs * 1000);
            *c = (secs, whole.trim_end_matches('Z').to_string());
        }
        out.extend_from_slice(c.1.as_bytes());
        true
    });
    if !cached {
        let _ = write!(out, "{}", crate::time::rfc3339_micros(at_us));
        return;
    }
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push(b'.');
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// Lines dropped because the writer could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// From now on this thread batches its lines; it must call `flush_this_thread` on a
/// timer (`flush_every`) and before it ends, or its last lines wait.
pub fn batch_this_thread() {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            *b = Some(Batch::default());
        }
    });
}

/// Hands this thread's batch to the writer (nothing on a thread that does not batch).
pub fn flush_this_thread() {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            if let Some(batch) = b.as_mut() {
                batch.hand_off();
            }
        }
    });
}

/// A batching thread's timer: hands over its batch every `FLUSH_EVERY`.
pub async fn flush_every() {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush_this_thread();
    }
}

/// Handed over when its thread ends, also by a panic that skipped `flush_this_thread`.
impl Drop for Batch {
    fn drop(&mut self) {
        self.hand_off();
    }
}

#[derive(Default)]
struct Batch {
    tx: Option<SyncSender<Msg>>,
    bytes: Vec<u8>,
    lines: u64,
}

impl Batch {
    fn push(&mut self, line: &[u8], tx: &SyncSender<Msg>) {
        self.start(tx);
        self.bytes.extend_from_slice(line);
        self.added();
    }

    /// Before the first line: where the batch goes, and room for it.
    fn start(&mut self, tx: &SyncSender<Msg>) {
        if self.tx.is_none() {
            self.tx = Some(tx.clone());
            self.bytes.reserve(BATCH_BYTES);
        }
    }

    /// After a line was written into `bytes`.
    fn added(&mut self) {
        self.lines += 1;
        if self.bytes.len() >= BATCH_BYTES {
            self.hand_off();
        }
    }

    fn hand_off(&mut self) {
        if self.bytes.is_empty() {
            return;
        }
        let full = std::mem::replace(&mut self.bytes, Vec::with_capacity(BATCH_BYTES));
        let lines = std::mem::take(&mut self.lines);
        match &self.tx {
            Some(tx) => send(tx, full, lines),
            None => count_dropped(lines),
        }
    }
}

fn send(tx: &SyncSender<Msg>, bytes: Vec<u8>, lines: u64) {
    if tx.try_send(Msg::Bytes(bytes, lines)).is_err() {
        count_dropped(lines);
    }
}

fn count_dropped(lines: u64) {
    DROPPED.fetch_add(lines, Ordering::Relaxed);
}

/// The subscriber's writer: each formatted event arrives in one `write`.
#[derive(Clone)]
pub struct Queue(SyncSender<Msg>);

/// One event's line on its way to the batch or the queue.
pub struct Line<'a>(&'a Queue);

impl<'a> MakeWriter<'a> for Queue {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self)
    }
}

impl Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let tx = &self.0 .0;
        let batched = BATCH.try_with(|b| match b.try_borrow_mut().as_deref_mut() {
            Ok(Some(batch)) => {
                batch.push(line, tx);
                true
            }
            _ => false,
        });
        if batched != Ok(true) {
            send(tx, line.to_vec(), 1);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The queue and its writer thread, writing to `out`.
fn start<W: Write + Send + 'static>(out: W) -> (Queue, Logging) {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let (done_tx, done) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("keygate-log".into())
        .spawn(move || {
            write_until_stopped(&rx, BufWriter::with_capacity(BATCH_BYTES, out), &stopping);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        eprintln!("keygate: cannot start the log writer ({e}); log lines are dropped");
    }
    let logging = Logging {
        tx: tx.clone(),
        stop,
        done,
    };
    (Queue(tx), logging)
}

/// Writes what arrives, flushing whenever the queue is empty, until `Msg::Stop` (or, if
/// the queue was too full to take it, until the queue is empty once `stop` is set).
fn write_until_stopped(rx: &Receiver<Msg>, mut out: impl Write, stop: &AtomicBool) {
    loop {
        let mut stopped = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(msg) => write_msg(&mut out, msg),
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        while let (false, Ok(msg)) = (stopped, rx.try_recv()) {
            stopped = write_msg(&mut out, msg);
        }
        let _ = out.flush();
        if stopped || (stop.load(Ordering::Acquire) && rx.try_recv().is_err()) {
            return;
        }
    }
}

/// Writes one message; true for `Msg::Stop`. Lines that cannot be written (stderr
/// closed or refusing) are counted as dropped.
fn write_msg(out: &mut impl Write, msg: Msg) -> bool {
    match msg {
        Msg::Bytes(bytes, lines) => {
            if out.write_all(&bytes).is_err() {
                count_dropped(lines);
            }
            false
        }
        Msg::Stop => true,
    }
}

impl Drop for Logging {
    fn drop(&mut self) {
        flush_this_thread();
        // `stop` matters only if the queue is too full to take `Msg::Stop`.
        if self.tx.try_send(Msg::Stop).is_err() {
            self.stop.store(true, Ordering::Release);
        }
        // Bounded: a stuck stderr must not keep the process from exiting.
        let _ = self.done.recv_timeout(FINAL_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that shares what it was given.
    #[derive(Clone, Default)]
    #[allow(
        clippy::disallowed_types,
        reason = "a test's sink, read after the writer stops"
    )]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `tracing` writes for the event the access log used to emit, without its
    /// timestamp (the first field in both formats).
    fn tracing_line(json: bool, a: &Access) -> String {
        let sink = Sink::default();
        let out = sink.clone();
        let make = move || out.clone();
        let fmt = tracing_subscriber::fmt().with_writer(make).with_ansi(false);
        let emit = || {
            tracing::info!(
                target: "keygate::access",
                method = %a.method,
                route = a.route,
                status = a.status,
                decision = a.decision,
                key_id = a.key_id,
                tenant = a.tenant,
                peer = %a.peer,
                duration_us = a.duration_us,
            )
        };
        if json {
            tracing::subscriber::with_default(fmt.json().flatten_event(true).finish(), emit);
        } else {
            tracing::subscriber::with_default(fmt.finish(), emit);
        }
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        without_timestamp(&text)
    }

    fn without_timestamp(line: &str) -> String {
        let at = line.find("Z").expect("a timestamp");
        line[at + 1..].to_string()
    }

    /// Access lines have `tracing`'s shape in both formats, quotes and escapes included.
    #[test]
    fn access_lines_are_what_tracing_would_write() {
        let cases = [("acme", "127.0.0.1"), ("odd \"tenant\"\\ é", "2001:db8::1")];
        for (tenant, peer) in cases {
            let a = Access {
                method: "GET",
                route: "users-read",
                status: 401,
                decision: "malformed_key",
                key_id: "0193b2c4-0000-7000-8000-000000000001",
                tenant,
                peer: peer.parse().unwrap(),
                duration_us: 88,
            };
            for (format, json) in [(TEXT, false), (JSON, true)] {
                let mut ours = Vec::new();
                format_access(&mut ours, format, 1_764_000_000_123_456, &a);
                let ours = String::from_utf8(ours).unwrap();
                assert!(ours.starts_with(if json {
                    "{\"timestamp\":\"2025-"
                } else {
                    "2025-"
                }));
                assert_eq!(without_timestamp(&ours), tracing_line(json, &a), "{ours}");
                let ts = crate::time::rfc3339_micros(1_764_000_000_123_456).to_string();
                assert!(ours.contains(&ts), "{ours} lacks {ts}");
            }
        }
    }

    /// Lines from a batching thread and from a thread that queues each line all arrive,
    /// each thread's in order, by the time the guard is dropped.
    #[test]
    fn every_line_is_written_by_the_time_the_guard_is_dropped() {
        let sink = Sink::default();
        let (queue, logging) = start(sink.clone());
        let batching = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                batch_this_thread();
                for i in 0..3000 {
                    let line = format!("batched {i}\n");
                    queue.make_writer().write_all(line.as_bytes()).unwrap();
                }
                flush_this_thread();
            })
        };
        // Fewer than the queue holds: none of them may be dropped.
        for i in 0..50 {
            let line = format!("single {i}\n");
            queue.make_writer().write_all(line.as_bytes()).unwrap();
        }
        batching.join().unwrap();
        drop(logging);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        for kind in ["batched", "single"] {
            let seen: Vec<&str> = text.lines().filter(|l| l.starts_with(kind)).collect();
            let n = if kind == "batched" { 3000 } else { 50 };
            let want: Vec<String> = (0..n).map(|i| format!("{kind} {i}")).collect();
            assert!(seen == want, "{kind}: {} lines of {n}", seen.len());
        }
        assert_eq!(dropped_lines(), 0);
    }
}

/// At most one line a second for a warning that can repeat on every request (the store
/// down under load), with how many were left out since the last one: the log stays
/// readable and its writer keeps up, while the metrics count every occurrence.
#[derive(Default)]
pub struct Sampled {
    last_ms: AtomicU64,
    skipped: AtomicU64,
}

impl Sampled {
    pub const fn new() -> Sampled {
        Sampled {
            last_ms: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// `Some(left out since the last line)` when this occurrence may be logged.
    pub fn pass(&self) -> Option<u64> {
        let now = crate::time::mono_ms().saturating_add(1_000);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= 1_000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if due {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod sampled_tests {
    use super::Sampled;

    #[test]
    fn one_line_a_second_telling_what_was_left_out() {
        let s = Sampled::new();
        assert_eq!(s.pass(), Some(0), "the first passes");
        for _ in 0..5 {
            assert_eq!(s.pass(), None);
        }
        // As if a second went by.
        s.last_ms
            .fetch_sub(1_000, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(s.pass(), Some(5));
        assert_eq!(s.pass(), None);
    }
}
