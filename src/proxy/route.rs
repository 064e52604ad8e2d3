//! Path normalisation (dot segments, repeated slashes, percent-escapes) and the ordered
//! route table: the upstream receives exactly the normalised path that was matched.

use serde::de::{self, Deserializer};
use std::borrow::Cow;
use std::fmt;

/// Why a request path was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with /")]
    NotAbsolute,
    #[error("encoded slash or backslash in path")]
    EncodedSeparator,
    #[error("invalid percent-escape in path")]
    BadEscape,
    #[error("backslash in path")]
    Backslash,
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|v| v as u8)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalise a request path: decode escapes of unreserved characters (so `%2e%2e` is
/// `..`), upper-case the others, refuse `%2F`, `%5C`, `\` and bad escapes, drop empty and
/// `.` segments, resolve `..` (never above the root) and keep a trailing slash.
/// Borrows when the path is already normal, which is the common case.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut simple = true;
    let mut prev = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Err(PathError::Backslash),
            b'%' => simple = false,
            b'/' if prev == b'/' => simple = false,
            b'.' if prev == b'/' => {
                // "/." starts a dot segment only if the segment is exactly "." or "..".
                let rest = &bytes[i..];
                let seg_end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
                if matches!(&rest[..seg_end], b"." | b"..") {
                    simple = false;
                }
            }
            _ => {}
        }
        prev = b;
    }
    if simple {
        return Ok(Cow::Borrowed(path));
    }

    // Decode escapes segment by segment.
    let mut segments: Vec<String> = Vec::new();
    let ends_with_slash_or_dot;
    {
        let raw_segments: Vec<&str> = path[1..].split('/').collect();
        let last = raw_segments.last().copied().unwrap_or("");
        let mut decoded_last = String::new();
        for (idx, raw) in raw_segments.iter().enumerate() {
            let mut seg = String::with_capacity(raw.len());
            let rb = raw.as_bytes();
            let mut i = 0;
            while i < rb.len() {
                if rb[i] == b'%' {
                    let (h, l) = match (
                        rb.get(i + 1).and_then(|&c| hex_val(c)),
                        rb.get(i + 2).and_then(|&c| hex_val(c)),
                    ) {
                        (Some(h), Some(l)) => (h, l),
                        _ => return Err(PathError::BadEscape),
                    };
                    let v = h * 16 + l;
                    if v == b'/' || v == b'\\' {
                        return Err(PathError::EncodedSeparator);
                    }
                    if is_unreserved(v) {
                        seg.push(v as char);
                    } else {
                        seg.push('%');
                        seg.push(char::from(b"0123456789ABCDEF"[h as usize]));
                        seg.push(char::from(b"0123456789ABCDEF"[l as usize]));
                    }
                    i += 3;
                } else {
                    seg.push(rb[i] as char);
                    i += 1;
                }
            }
            if idx == raw_segments.len() - 1 {
                decoded_last = seg.clone();
            }
            match seg.as_str() {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                _ => segments.push(seg),
            }
        }
        let _ = last;
        ends_with_slash_or_dot = matches!(decoded_last.as_str(), "" | "." | "..");
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if ends_with_slash_or_dot || segments.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    /// `*`: exactly one segment.
    One,
    /// `**`: zero or more segments; only last.
    Rest,
}

/// A compiled route path pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: Box<str>,
    segments: Box<[Segment]>,
    trailing_slash: bool,
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("path pattern {text:?} must start with /"));
        }
        match normalize(text) {
            Ok(n) if n == text => {}
            _ => {
                return Err(format!(
                    "path pattern {text:?} is not normalised (no //, ., .., or percent-escapes)"
                ))
            }
        }
        let body = &text[1..];
        let trailing_slash = body.ends_with('/') && !body.is_empty();
        let parts: Vec<&str> = body.split('/').filter(|s| !s.is_empty()).collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            segments.push(match *p {
                "*" => Segment::One,
                "**" if i == parts.len() - 1 => Segment::Rest,
                "**" => return Err(format!("in {text:?}, ** may only be the last segment")),
                lit if lit.contains('*') => {
                    return Err(format!("in {text:?}, * must be a whole segment"))
                }
                lit => Segment::Literal(lit.into()),
            });
        }
        Ok(PathPattern {
            text: text.into(),
            segments: segments.into(),
            trailing_slash,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first segment when it is a literal: the route table indexes on it.
    pub fn first_literal(&self) -> Option<&str> {
        match self.segments.first() {
            Some(Segment::Literal(l)) => Some(l),
            _ => None,
        }
    }

    /// Match a normalised path. Literal segments compare exactly (case-sensitive).
    pub fn matches(&self, path: &str) -> bool {
        match SplitPath::new(path) {
            Some(p) => self.matches_split(&p),
            None => {
                let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
                self.matches_segments(&parts, path.len() > 1 && path.ends_with('/'))
            }
        }
    }

    /// Match a path split once (the route table splits once for all routes).
    pub fn matches_split(&self, path: &SplitPath<'_>) -> bool {
        self.matches_segments(path.segments(), path.trailing)
    }

    fn matches_segments(&self, parts: &[&str], trailing: bool) -> bool {
        let mut i = 0;
        for seg in self.segments.iter() {
            match seg {
                Segment::Rest => return true,
                Segment::One => {
                    if i >= parts.len() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.get(i) != Some(&&**l) {
                        return false;
                    }
                }
            }
            i += 1;
        }
        i == parts.len() && (self.trailing_slash == trailing || self.segments.is_empty())
    }
}

/// Segments of a normalised path, split once without allocating.
pub struct SplitPath<'a> {
    segs: [&'a str; SplitPath::MAX],
    len: usize,
    trailing: bool,
}

impl<'a> SplitPath<'a> {
    /// Deeper paths take the (allocating) slow path.
    pub const MAX: usize = 32;

    pub fn new(path: &'a str) -> Option<Self> {
        let mut segs = [""; Self::MAX];
        let mut len = 0;
        for part in path.split('/').filter(|s| !s.is_empty()) {
            if len == Self::MAX {
                return None;
            }
            segs[len] = part;
            len += 1;
        }
        Some(SplitPath {
            segs,
            len,
            trailing: path.len() > 1 && path.ends_with('/'),
        })
    }

    pub fn segments(&self) -> &[&'a str] {
        &self.segs[..self.len]
    }

    pub fn first(&self) -> Option<&'a str> {
        self.segments().first().copied()
    }
}

impl<'de> serde::Deserialize<'de> for PathPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PathPattern::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        let cases = [
            ("/", "/"),
            ("/users", "/users"),
            ("/users/", "/users/"),
            ("//admin", "/admin"),
            ("/users/../admin", "/admin"),
            ("/users/./a", "/users/a"),
            ("/../../etc", "/etc"),
            ("/%2e%2e/admin", "/admin"),
            ("/users/%2E%2e/admin", "/admin"),
            ("/a/%7euser", "/a/~user"),
            ("/a/%3f", "/a/%3F"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/.hidden", "/a/.hidden"),
            ("/a/..b", "/a/..b"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).unwrap(), want, "{input}");
        }
        assert!(matches!(normalize("/users/x"), Ok(Cow::Borrowed(_))));
        assert_eq!(normalize("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%2fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%5Cb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a\\b"), Err(PathError::Backslash));
        assert_eq!(normalize("a"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn patterns() {
        let p = PathPattern::parse("/users/**").unwrap();
        for ok in ["/users", "/users/", "/users/1", "/users/1/x"] {
            assert!(p.matches(ok), "{ok}");
        }
        for no in ["/user", "/usersx", "/admin/users"] {
            assert!(!p.matches(no), "{no}");
        }
        let one = PathPattern::parse("/orgs/*/members").unwrap();
        assert!(one.matches("/orgs/7/members"));
        assert!(!one.matches("/orgs/members"));
        assert!(!one.matches("/orgs/7/8/members"));
        let exact = PathPattern::parse("/healthz").unwrap();
        assert!(exact.matches("/healthz"));
        assert!(!exact.matches("/healthz/"));
        assert!(!exact.matches("/healthz/x"));
        let root = PathPattern::parse("/").unwrap();
        assert!(root.matches("/"));
        assert!(!root.matches("/x"));
        assert!(PathPattern::parse("/**")
            .unwrap()
            .matches("/anything/at/all"));
        for bad in ["users", "/a/**/b", "/a*", "//a", "/a/../b", "/a%2Fb"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
