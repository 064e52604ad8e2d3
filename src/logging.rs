//! Process logs (the access log among them): formatted where they happen, written to
//! stderr by a thread of their own so a request never waits on the terminal or a pipe.

use std::io::BufWriter;
use std::sync::OnceLock;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines waiting for the writer before new ones are dropped (and counted): at ~250 bytes a
/// line, a few MiB at most however slow stderr's reader is.
const QUEUE_LINES: usize = 16_384;

/// The writer's buffer: one `write` per this many bytes under load, one per drained queue
/// when idle (the writer flushes whenever it has nothing more to write).
const WRITE_BUFFER: usize = 64 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the writer thread alive; dropping it writes what is queued (bounded wait).
#[must_use = "dropping the guard stops the log writer"]
pub struct Logging {
    _writer: WorkerGuard,
}

/// Installs the global subscriber. Filter: `KEYGATE_LOG`, else `RUST_LOG`, else `info`.
/// Format: `KEYGATE_LOG_FORMAT=json`, else text (coloured on a terminal).
pub fn init() -> Logging {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("keygate-log")
        .finish(BufWriter::with_capacity(WRITE_BUFFER, std::io::stderr()));
    let _ = DROPPED.set(writer.error_counter());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match std::env::var("KEYGATE_LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().flatten_event(true).init(),
        _ => logs.init(),
    }
    Logging { _writer: guard }
}

/// Lines dropped because the writer could not keep up (0 before `init`).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
