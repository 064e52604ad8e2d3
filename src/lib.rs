//! keygate: a reverse-proxy authentication sidecar. API keys in `Authorization: Bearer`
//! are checked against a lock-free cache backed by a key store, route scopes are enforced,
//! and allowed requests reach the upstream with the caller's identity in headers.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cache;
pub mod config;
pub mod connection;
pub mod dev;
pub mod dormant;
pub mod error;
pub mod explain;
pub mod feed;
pub mod header_names;
pub mod key;
pub mod limits;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod secret_scanning;
pub mod snapshot;
pub mod store;
pub mod time;
pub mod tls;
pub mod usage;
pub mod watch;

pub use app::App;
