//! Request header names the proxy strips from clients, shared with the config check:
//! none of them may carry identity to the upstream either. A leaf module, so that both
//! `config` and `proxy` can read it.

/// Headers by which an upstream framework would act on another method or path than the
/// one keygate matched (Rails, Express, Symfony, IIS URL rewrite), and keygate's own
/// `x-keygate-ratelimit` (set only by keygate): never forwarded from a client.
pub const OVERRIDES: [&str; 7] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
    "x-keygate-ratelimit",
];

/// Client address, host, scheme and original-URL claims besides
/// `X-Forwarded-For/Proto/Host` (which are rewritten): kept from trusted proxies only.
/// `Forwarded` is extended for those.
pub const CLIENT_CLAIMS: [&str; 20] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "x-originating-ip",
    "x-remote-addr",
    "x-remote-ip",
    "x-host",
    "x-forwarded-uri",
    "x-original-uri",
    "x-envoy-original-path",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
];
