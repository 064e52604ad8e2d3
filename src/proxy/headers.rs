//! The headers of a proxied message: what a client may not tell the upstream (hop-by-hop,
//! look-alikes, overrides, untrusted address claims) is removed, and what keygate vouches
//! for (identity, `X-Forwarded-*`, `Forwarded`, `Host`, an allowed `Upgrade`) is set.

use super::Conn;
use crate::cache::Identity;
use crate::policy::Policy;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
/// Set on a request admitted without its rate limits checked (the store was unavailable).
pub const RATELIMIT_MARK: HeaderName = HeaderName::from_static("x-keygate-ratelimit");

use crate::header_names::{CLIENT_CLAIMS, OVERRIDES};

/// Bit n set when a name in `OVERRIDES` or `CLIENT_CLAIMS` is n bytes long: most header
/// names are ruled out by their length alone.
const CLAIM_LENGTHS: u64 = {
    let mut mask = 0u64;
    let mut i = 0;
    while i < OVERRIDES.len() {
        mask |= 1 << OVERRIDES[i].len();
        i += 1;
    }
    let mut i = 0;
    while i < CLIENT_CLAIMS.len() {
        mask |= 1 << CLIENT_CLAIMS[i].len();
        i += 1;
    }
    mask
};

/// Headers that only concern one hop (RFC 9110 7.6.1, plus legacy ones and the h2c
/// upgrade's `HTTP2-Settings`).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HTTP2_SETTINGS,
];

/// Every header the upstream sees is one keygate vouches for: the client's are cleaned
/// (`strip_client_headers`), then identity, `X-Forwarded-*`, `Host` (`host`: see
/// `request_host`) and the allowed `upgrade` are set.
pub fn set_request_headers(
    headers: &mut HeaderMap,
    policy: &Policy,
    conn: &Conn,
    identity: Option<&Identity>,
    host: Option<HeaderValue>,
    upgrade: Option<&HeaderValue>,
    unchecked: bool,
) {
    // Room for what is added below at once, instead of the map growing insert by
    // insert (`try_`: a map already at http's size limit just grows as it can).
    let _ = headers.try_reserve(10);
    let trusted = (policy.headers.trusted_proxies.iter()).any(|n| n.contains(&conn.peer.ip()));
    strip_client_headers(headers, policy, trusted);
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    headers.remove(header::PROXY_AUTHORIZATION);
    if !policy.headers.forward_authorization {
        headers.remove(header::AUTHORIZATION);
    }
    set_identity(headers, policy, identity);
    // keygate's word only: a client's copy was stripped with the overrides above.
    if unchecked {
        headers.insert(RATELIMIT_MARK, HeaderValue::from_static("unchecked"));
    }
    set_forwarded(headers, conn, trusted, host.as_ref());
    if let Some(h) = host {
        headers.insert(header::HOST, h);
    }
}

/// The protocols of an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade`)
/// that `allowed` names, as the `Upgrade` value to forward; `None` when it offers none
/// (then it is forwarded as a plain request, its `Upgrade` removed).
pub fn upgrade_offer<B>(req: &Request<B>, allowed: &[Box<str>]) -> Option<HeaderValue> {
    let asks = req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let offered = req
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| allowed_protocol(p, allowed));
    let kept: Vec<&str> = offered.collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// `websocket` or `websocket/13` when `websocket` is allowed (names are case-insensitive).
fn allowed_protocol(protocol: &str, allowed: &[Box<str>]) -> bool {
    let name = protocol.split('/').next().unwrap_or("").trim();
    !name.is_empty() && allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// The upstream switched to one of the protocols offered to it.
pub fn switched_to_offered<B>(resp: &Response<B>, offer: &HeaderValue) -> bool {
    let Some(chosen) = resp
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let name = chosen.split('/').next().unwrap_or("").trim();
    offer.to_str().unwrap_or("").split(',').any(|p| {
        p.split('/')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case(name)
    })
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Remove hop-by-hop headers and those the `Connection` header names. `Host` and
/// `Content-Length` survive: they frame and address the message.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few names present (one bit per `HOP_BY_HOP` entry) instead of a
    // hash lookup per hop-by-hop name: most messages carry none, or only `Connection`.
    let mut present = 0u8;
    for n in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == n) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // `HOP_BY_HOP[0]` is `Connection`. Its usual tokens (`close`, `keep-alive`,
    // `upgrade`) are not other headers to look for, or are in `HOP_BY_HOP` already.
    let mut named = Vec::new();
    if present & 1 != 0 {
        for t in connection_tokens(headers) {
            if ["close", "keep-alive", "upgrade"]
                .iter()
                .any(|u| t.eq_ignore_ascii_case(u))
            {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                if n != header::HOST && n != header::CONTENT_LENGTH && !HOP_BY_HOP.contains(&n) {
                    named.push(n);
                }
            }
        }
    }
    for n in named {
        headers.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(n);
        }
    }
}

/// Remove what a client may not tell the upstream: hop-by-hop headers; any header with an
/// `_` in its name (CGI, WSGI, Rack and PHP read `x_keygate_tenant` as
/// `x-keygate-tenant`), or with `underscore_headers: keep` those that would read as a
/// header keygate vouches for; method and URL overrides; and, unless the peer is a
/// trusted proxy, client address and scheme claims.
fn strip_client_headers(headers: &mut HeaderMap, policy: &Policy, trusted: bool) {
    strip_hop_by_hop(headers);
    let mut refused = Vec::new();
    for name in headers.keys() {
        if refuse(name.as_str(), policy, trusted) {
            refused.push(name.clone());
        }
    }
    for n in refused {
        headers.remove(n);
    }
}

fn refuse(name: &str, policy: &Policy, trusted: bool) -> bool {
    if name.as_bytes().contains(&b'_') {
        return !policy.headers.keep_underscore_headers || vouched(&name.replace('_', "-"), policy);
    }
    if name.len() >= 64 || CLAIM_LENGTHS & (1 << name.len()) == 0 {
        return false;
    }
    OVERRIDES.contains(&name) || (!trusted && CLIENT_CLAIMS.contains(&name))
}

/// A name keygate sets, rewrites or strips: a look-alike spelling must not reach the
/// upstream either.
fn vouched(name: &str, policy: &Policy) -> bool {
    let ids = &policy.headers.identity;
    [&ids.key_id, &ids.tenant, &ids.scopes, &ids.key_type]
        .iter()
        .any(|n| n.as_str() == name)
        || HOP_BY_HOP.iter().any(|n| n.as_str() == name)
        || OVERRIDES.contains(&name)
        || CLIENT_CLAIMS.contains(&name)
        || [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "authorization",
            "proxy-authorization",
            "host",
            "content-length",
        ]
        .contains(&name)
}

/// Identity headers are set by keygate only: a client's copies are always removed.
fn set_identity(headers: &mut HeaderMap, policy: &Policy, identity: Option<&Identity>) {
    let names = &policy.headers.identity;
    match identity {
        Some(id) => {
            headers.insert(names.key_id.clone(), id.id_header());
            headers.insert(names.tenant.clone(), id.tenant_header());
            headers.insert(names.scopes.clone(), id.scopes_header());
            headers.insert(names.key_type.clone(), id.type_header());
        }
        None => {
            let all = [&names.key_id, &names.tenant, &names.scopes, &names.key_type];
            // Comparing the few names present is cheaper than four hash lookups.
            if headers.keys().any(|k| all.contains(&k)) {
                for n in all {
                    headers.remove(n);
                }
            }
        }
    }
}

/// `X-Forwarded-*`: kept and extended for trusted peers, overwritten for everyone else;
/// `Forwarded` (RFC 7239) is extended for trusted peers and was removed for the others.
fn set_forwarded(headers: &mut HeaderMap, conn: &Conn, trusted: bool, host: Option<&HeaderValue>) {
    let peer_ip = conn.peer.ip();
    let proto = if conn.tls { "https" } else { "http" };
    if trusted {
        extend_forwarded(headers, peer_ip, proto);
    }
    // A client's own X-Forwarded-For is only looked at when it is trusted.
    let prev = if trusted {
        headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok())
    } else {
        None
    };
    let xff = match prev {
        Some(prev) if headers.get_all(X_FORWARDED_FOR).iter().count() == 1 => {
            HeaderValue::from_str(&format!("{prev}, {peer_ip}")).ok()
        }
        // The usual case: the connection's own value, built once when it was accepted.
        _ => Some(conn.peer_header.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !(trusted && headers.contains_key(X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted && headers.contains_key(X_FORWARDED_HOST)) {
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
}

/// A trusted proxy's `Forwarded` elements, then this hop's (`for`, quoted for IPv6).
fn extend_forwarded(headers: &mut HeaderMap, peer: std::net::IpAddr, proto: &str) {
    let prev: Vec<&str> = headers
        .get_all(FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if prev.is_empty() {
        return;
    }
    let this = match peer {
        std::net::IpAddr::V4(ip) => format!("for={ip};proto={proto}"),
        std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto={proto}"),
    };
    let value = format!("{}, {this}", prev.join(", "));
    match HeaderValue::from_str(&value) {
        Ok(v) => {
            headers.insert(FORWARDED, v);
        }
        Err(_) => {
            headers.remove(FORWARDED);
        }
    }
}
