//! The host a request is for (RFC 9112 §3.2, RFC 9113 §8.3.1): exactly one valid `Host`
//! on HTTP/1.1, and the target's own authority (absolute form, HTTP/2 `:authority`) wins
//! over it; an absolute target must be `http` or `https`. That host is what the upstream
//! is told.

use crate::error::Deny;
use http::header::HOST;
use http::{HeaderValue, Request, Version};

/// The host the upstream is told, or 400 `bad_host`: HTTP/1.1 without `Host`, several
/// `Host` fields, an invalid one, or a target authority with user info.
pub fn request_host<B>(req: &Request<B>) -> Result<Option<HeaderValue>, Deny> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(Deny::BadHost);
    }
    if first.is_some_and(|h| !valid_host(h.as_bytes())) {
        return Err(Deny::BadHost);
    }
    if first.is_none() && req.version() == Version::HTTP_11 {
        return Err(Deny::BadHost);
    }
    let scheme_ok = req
        .uri()
        .scheme()
        .is_none_or(|s| *s == http::uri::Scheme::HTTP || *s == http::uri::Scheme::HTTPS);
    if !scheme_ok {
        return Err(Deny::BadHost);
    }
    match req.uri().authority() {
        Some(a) if valid_host(a.as_str().as_bytes()) => HeaderValue::from_str(a.as_str())
            .map(Some)
            .map_err(|_| Deny::BadHost),
        Some(_) => Err(Deny::BadHost),
        None => Ok(first.cloned()),
    }
}

/// `host[:port]` where host is a registered name, an IPv4 address or a bracketed IPv6
/// literal (RFC 3986 §3.2.2): no user info, path, spaces or empty value.
pub fn valid_host(h: &[u8]) -> bool {
    let (host, port) = match h.first() {
        None => return false,
        Some(b'[') => match h.iter().position(|&b| b == b']') {
            Some(end) => (&h[..=end], &h[end + 1..]),
            None => return false,
        },
        Some(_) => match h.iter().rposition(|&b| b == b':') {
            Some(colon) => (&h[..colon], &h[colon..]),
            None => (h, &h[h.len()..]),
        },
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => {
            (1..=5).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(digits).is_ok_and(|d| d.parse::<u16>().is_ok())
        }
        Some(_) => false,
    };
    port_ok && host_ok(host)
}

fn host_ok(host: &[u8]) -> bool {
    if let Some(inner) = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        return !inner.is_empty()
            && inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    // reg-name: unreserved, sub-delims and percent-escapes.
    !host.is_empty()
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "kg.test",
            "kg.test:8080",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:443",
            "a-b_c~d",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "kg.test:",
            "kg.test:80x",
            "kg.test:123456",
            "kg.test:65536",
            "kg.test:99999",
            "user@kg.test",
            "kg.test/x",
            "kg test",
            "[::1",
            "[]",
            "[::1]x",
            "kg.test\\x",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn the_target_authority_wins_and_http11_needs_one_host() {
        let req = |v: Version, uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().version(v).uri(uri);
            for h in hosts {
                b = b.header(HOST, *h);
            }
            b.body(()).unwrap()
        };
        let host =
            |r: Request<()>| request_host(&r).map(|h| h.map(|v| v.to_str().unwrap().to_string()));
        assert_eq!(
            host(req(Version::HTTP_11, "/", &["a.test"])),
            Ok(Some("a.test".into()))
        );
        assert_eq!(host(req(Version::HTTP_11, "/", &[])), Err(Deny::BadHost));
        assert_eq!(
            host(req(Version::HTTP_11, "/", &["a.test", "b.test"])),
            Err(Deny::BadHost)
        );
        assert_eq!(
            host(req(Version::HTTP_11, "/", &["a b"])),
            Err(Deny::BadHost)
        );
        assert_eq!(host(req(Version::HTTP_10, "/", &[])), Ok(None));
        assert_eq!(
            host(req(Version::HTTP_11, "http://b.test/x", &["a.test"])),
            Ok(Some("b.test".into()))
        );
        assert_eq!(
            host(req(Version::HTTP_11, "http://u@b.test/x", &["a.test"])),
            Err(Deny::BadHost)
        );
        assert_eq!(
            host(req(Version::HTTP_2, "http://b.test/x", &["a.test"])),
            Ok(Some("b.test".into()))
        );
        assert_eq!(
            host(req(Version::HTTP_11, "ftp://b.test/x", &["a.test"])),
            Err(Deny::BadHost)
        );
    }
}
