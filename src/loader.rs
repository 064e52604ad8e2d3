//! `keygate import`: a file of keys, one JSON object a line (an entry of
//! `POST /v1/api-keys/import`), sent to a running keygate's admin API in batches of up to
//! 1,000 entries and 1 MB, with a progress line per batch on stderr and a summary that
//! names each failed line by number and code. A client only: it shares no code with the
//! server but the JSON shapes.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Duration;

/// Entries per call: the endpoint's limit.
pub const MAX_BATCH: usize = 1000;
/// Bytes of entries per call, below the endpoint's 1 MiB body limit.
const MAX_BATCH_BYTES: usize = 1_000_000;
/// Bound on one call (a batch of 1,000 on a slow store takes seconds, not minutes).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read.
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// What to import and where.
pub struct Job {
    /// The admin API's base URL, `http://127.0.0.1:9901`.
    pub admin: String,
    /// A root token or a management key with `keys:write`.
    pub token: String,
    /// `X-Tenant-ID` for every call.
    pub tenant: Option<String>,
    pub batch: usize,
}

/// One line that did not import: its number (from 1), code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub code: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub imported: usize,
    pub failed: Vec<LineError>,
    pub warnings: Vec<LineError>,
}

/// Why nothing (more) could be sent.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Setup(String),
    /// Lines that are not JSON objects: nothing was sent.
    #[error("the file has {} bad line(s)", .0.len())]
    BadLines(Vec<LineError>),
    /// The admin API refused the credentials, or could not be reached: the lines of the
    /// batches before were sent (see the report).
    #[error("{message}")]
    Stopped { message: String, report: Report },
}

/// The entries of a JSON-lines file with their line numbers; empty lines are skipped.
pub fn read_lines(text: &str) -> Result<Vec<(usize, Value)>, LoadError> {
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(v @ Value::Object(_)) => entries.push((i + 1, v)),
            Ok(_) => bad.push(bad_line(i + 1, "not a JSON object".into())),
            Err(e) => bad.push(bad_line(i + 1, format!("invalid JSON: {e}"))),
        }
    }
    if bad.is_empty() {
        Ok(entries)
    } else {
        Err(LoadError::BadLines(bad))
    }
}

fn bad_line(line: usize, message: String) -> LineError {
    LineError {
        line,
        code: "invalid_line".into(),
        message,
    }
}

/// Batches of at most `max` entries and [`MAX_BATCH_BYTES`] of JSON (one entry larger
/// than that goes alone; the endpoint answers 413 for it).
pub fn batches(entries: Vec<(usize, Value)>, max: usize) -> Vec<Vec<(usize, Value)>> {
    let mut out: Vec<Vec<(usize, Value)>> = Vec::new();
    let mut bytes = 0;
    for (line, v) in entries {
        let size = v.to_string().len() + 1;
        match out.last_mut() {
            Some(b) if b.len() < max && bytes + size <= MAX_BATCH_BYTES => {
                b.push((line, v));
                bytes += size;
            }
            _ => {
                out.push(vec![(line, v)]);
                bytes = size;
            }
        }
    }
    out
}

/// Send every batch in order; `progress` is called after each.
pub async fn run(
    job: &Job,
    entries: Vec<(usize, Value)>,
    mut progress: impl FnMut(usize, usize, &Report),
) -> Result<Report, LoadError> {
    let total = entries.len();
    let client = client()?;
    let uri = format!("{}/v1/api-keys/import", job.admin.trim_end_matches('/'));
    let mut report = Report::default();
    let mut sent = 0;
    for batch in batches(entries, job.batch.clamp(1, MAX_BATCH)) {
        let lines: Vec<usize> = batch.iter().map(|(l, _)| *l).collect();
        let body =
            serde_json::json!({"keys": batch.into_iter().map(|(_, v)| v).collect::<Vec<_>>()});
        match call(&client, &uri, job, body.to_string()).await {
            Ok((200, answer)) => merge(&mut report, &lines, &answer),
            Ok((status @ (401 | 403), answer)) => {
                let message = format!(
                    "the admin API refused the call ({status}): {}",
                    said(&answer)
                );
                return Err(LoadError::Stopped { message, report });
            }
            Ok((status, answer)) => {
                // The batch was refused whole (its shape): every line of it failed.
                let code = answer["error"]["code"].as_str().unwrap_or("http_error");
                let message = format!("batch refused ({status}): {}", said(&answer));
                report.failed.extend(lines.iter().map(|&line| LineError {
                    line,
                    code: code.into(),
                    message: message.clone(),
                }));
            }
            Err(message) => return Err(LoadError::Stopped { message, report }),
        }
        sent += lines.len();
        progress(sent, total, &report);
    }
    Ok(report)
}

/// An error answer's message, or its text.
fn said(answer: &Value) -> String {
    answer["error"]["message"]
        .as_str()
        .map_or_else(|| answer.to_string(), str::to_string)
}

/// Count an import answer: its errors and warnings by line.
fn merge(report: &mut Report, lines: &[usize], answer: &Value) {
    report.imported += answer["imported"].as_u64().unwrap_or(0) as usize;
    let at = |list: &str| -> Vec<LineError> {
        let items = answer[list]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        items
            .iter()
            .map(|e| LineError {
                line: e["index"]
                    .as_u64()
                    .and_then(|i| lines.get(i as usize).copied())
                    .unwrap_or(0),
                code: e["code"].as_str().unwrap_or("unknown").into(),
                message: e["message"].as_str().unwrap_or_default().into(),
            })
            .collect()
    };
    report.failed.extend(at("errors"));
    report.warnings.extend(at("warnings"));
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client() -> Result<HttpsClient, LoadError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| LoadError::Setup(format!("no TLS root certificates: {e}")))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// One POST: the status and the JSON answer (`Null` when it is not JSON).
async fn call(
    client: &HttpsClient,
    uri: &str,
    job: &Job,
    body: String,
) -> Result<(u16, Value), String> {
    let mut req = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {}", job.token));
    if let Some(t) = &job.tenant {
        req = req.header("x-tenant-id", t);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("--admin {uri}: {e}"))?;
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("{uri}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{uri}: reading the answer: {e}"))?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{uri}: no answer within {CALL_TIMEOUT:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_and_bad_ones_all_named() {
        let ok = read_lines("{\"a\":1}\n\n  \n{\"b\":2}\n").unwrap();
        assert_eq!(ok.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [1, 4]);
        let Err(LoadError::BadLines(bad)) = read_lines("{\"a\":1}\n[1]\n{oops\n") else {
            panic!("bad lines accepted");
        };
        assert_eq!(bad.iter().map(|e| e.line).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn batches_keep_order_within_count_and_size() {
        let entries: Vec<_> = (1..=2500)
            .map(|l| (l, serde_json::json!({"n": l})))
            .collect();
        let b = batches(entries, MAX_BATCH);
        assert_eq!(
            b.iter().map(Vec::len).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        assert_eq!(b[1][0].0, 1001);
        let big = "x".repeat(300_000);
        let entries: Vec<_> = (1..=7)
            .map(|l| (l, serde_json::json!({"k": big})))
            .collect();
        assert_eq!(
            batches(entries, MAX_BATCH)
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            [3, 3, 1]
        );
    }

    #[test]
    fn answers_map_back_to_line_numbers() {
        let mut r = Report::default();
        let answer = serde_json::json!({
            "imported": 1, "keys": [{"index": 0, "id": "x"}],
            "errors": [{"index": 1, "code": "duplicate_key", "message": "m"}],
            "warnings": [{"index": 0, "code": "format_not_accepted", "message": "w"}]
        });
        merge(&mut r, &[7, 9], &answer);
        assert_eq!(r.imported, 1);
        assert_eq!(
            (r.failed[0].line, r.failed[0].code.as_str()),
            (9, "duplicate_key")
        );
        assert_eq!(r.warnings[0].line, 7);
    }
}
