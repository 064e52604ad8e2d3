//! Rate-limit counters in Redis (standalone, Sentinel or Cluster): one Lua script per
//! decision, every key of it under one hash tag.
