//! Rate-limit counters in this process, for the in-memory store (`--dev`, tests): the same
//! behaviour as `redis.rs`.
