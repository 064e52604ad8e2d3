//! Integration tests: real sockets, a real `redis-server` started per test, a real
//! upstream (the echo server), and keygate itself in-process or as a child process.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "test and bench code: the request-path rules are for src/"
)]

mod support;
mod support_cluster;
mod support_ha;

mod admin_hellojohn;
mod admin_jack;
mod admin_limits;
mod cli;
mod cluster;
mod code_map;
mod contract;
mod crash;
mod dormant;
mod explain;
mod feed;
mod h2_tools;
mod hostile;
mod import;
mod k8s;
mod k8s_sentinel;
mod lifecycle;
mod limits;
mod metrics;
mod migrate;
mod paths;
mod proxy_auth;
mod proxy_forward;
mod ratelimit;
mod ratelimit_store;
mod raw;
mod redis_store;
mod reload;
mod reload_cache;
mod secret_scanning;
mod sentinel;
mod streaming;
mod tls;
