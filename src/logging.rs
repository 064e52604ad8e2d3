//! Process logs (the access log among them): formatted where they happen, queued, and
//! written to stderr by a thread of their own, so a request never waits on a pipe.
//!
//! Not `tracing-appender`'s non-blocking writer: its thread blocks on the queue, so under
//! load every line wakes it (a futex call) and is written alone (a `write` call), which
//! the load bench showed as most of the access log's cost. This writer wakes on a timer
//! instead: senders only enqueue, and each wake writes everything queued in one batch.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting for the writer before new ones are dropped (and counted): at ~250 bytes a
/// line, a few MiB at most however slow stderr's reader is.
const QUEUE_LINES: usize = 16_384;

/// The writer's buffer: one `write` per this many bytes, or per wake.
const WRITE_BUFFER: usize = 64 * 1024;

/// How long a line may wait in the queue: invisible to a person tailing the log, and
/// few enough wakes to cost nothing.
const WAKE_EVERY: Duration = Duration::from_millis(20);

/// How long shutdown waits for the queue to be written (stderr may be stuck).
const FINAL_WRITE: Duration = Duration::from_secs(2);

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Keeps the writer thread; dropping it writes what is queued (bounded wait) and stops it.
#[must_use = "dropping the guard stops the log writer"]
pub struct Logging {
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
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
    match std::env::var("KEYGATE_LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().flatten_event(true).init(),
        _ => logs.init(),
    }
    logging
}

/// Lines dropped because the writer could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The queue's sending side: what the subscriber writes each formatted line to.
#[derive(Clone)]
pub struct Queue(SyncSender<Vec<u8>>);

/// One line on its way to the queue (the subscriber writes a whole event at once).
pub struct Line<'a>(&'a Queue);

impl<'a> MakeWriter<'a> for Queue {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self)
    }
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0 .0.try_send(buf.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The queue and its writer thread, writing to `out`.
fn start<W: Write + Send + 'static>(out: W) -> (Queue, Logging) {
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let (done_tx, done) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let writer = std::thread::Builder::new()
        .name("keygate-log".into())
        .spawn(move || {
            write_until_stopped(&rx, BufWriter::with_capacity(WRITE_BUFFER, out), &stopping);
            let _ = done_tx.send(());
        })
        .ok();
    let logging = Logging { stop, writer, done };
    (Queue(tx), logging)
}

/// Wake, write every queued line and flush, sleep; once stopped, a last round.
fn write_until_stopped(rx: &Receiver<Vec<u8>>, mut out: impl Write, stop: &AtomicBool) {
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let open = drain(rx, &mut out);
        // A failed write (stderr closed) leaves nothing to do but keep the queue moving.
        let _ = out.flush();
        if stopping || !open {
            return;
        }
        std::thread::park_timeout(WAKE_EVERY);
    }
}

/// Writes what is queued now; false once every sender is gone.
fn drain(rx: &Receiver<Vec<u8>>, out: &mut impl Write) -> bool {
    loop {
        match rx.try_recv() {
            Ok(line) => {
                let _ = out.write_all(&line);
            }
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
}

impl Drop for Logging {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(writer) = self.writer.take() {
            writer.thread().unpark();
            // Bounded: a stuck stderr must not keep the process from exiting.
            if self.done.recv_timeout(FINAL_WRITE).is_ok() {
                let _ = writer.join();
            }
        }
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

    #[test]
    fn queued_lines_are_written_in_order_by_the_time_the_guard_is_dropped() {
        let sink = Sink::default();
        let (queue, logging) = start(sink.clone());
        for i in 0..1000 {
            writeln!(queue.make_writer(), "line {i}").unwrap();
        }
        drop(logging);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, want);
    }
}
