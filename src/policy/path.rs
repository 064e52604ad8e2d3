//! Path normalisation (dot segments, repeated slashes, percent-escapes) and route path
//! patterns: the upstream receives exactly the normalised path that was matched.
//!
//! Paths that different servers would read differently are refused rather than guessed
//! at: encoded separators, dot segments hidden behind `;params` (servlet containers strip
//! those before resolving `..`), encoded control characters and double-encoded dots or
//! separators. Whether a `;params` path matches the same route either way is the route
//! table's question (`Policy::find_unambiguous`); this module reports that one is present.

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
    /// `..;x`, `.;`, `;x`: Tomcat, Jetty and Spring drop `;params` and then resolve the
    /// dot (or empty) segment that is left, so the upstream would see another path.
    #[error("dot or empty segment with path parameters")]
    DotSegmentParams,
    /// `%00`-`%1F`, `%7F` (or such a byte raw): upstreams truncate at NUL or split at CR/LF.
    #[error("control character in path")]
    ControlChar,
    /// `%252e`, `%252f`, `%255c`, ...: an upstream that decodes twice sees `.`, `/`, `\`.
    #[error("double-encoded dot, separator or control character in path")]
    DoubleEncoded,
}

/// A normalised path, and whether it holds `;` (path parameters), which makes its route
/// depend on whether the upstream strips them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized<'a> {
    pub path: Cow<'a, str>,
    pub has_params: bool,
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|v| v as u8)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7F
}

/// A segment (before its first `;`) that resolves as a directory step, not a name.
fn is_dot_or_empty(seg: &[u8]) -> bool {
    matches!(seg, b"" | b"." | b"..")
}

/// Normalise a request path: decode escapes of unreserved characters (so `%2e%2e` is
/// `..`), upper-case the others, refuse what `PathError` lists, drop empty and `.`
/// segments, resolve `..` (never above the root) and keep a trailing slash.
/// Borrows when the path is already normal, which is the common case.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    normalize_request(path).map(|n| n.path)
}

/// `normalize`, also telling whether the path has `;` (found by the same first pass).
pub fn normalize_request(path: &str) -> Result<Normalized<'_>, PathError> {
    let scan = scan(path.as_bytes())?;
    if scan.simple {
        return Ok(Normalized {
            path: Cow::Borrowed(path),
            has_params: scan.has_params,
        });
    }
    let path = rebuild(path)?;
    // `..` may have dropped the only segment with `;` (`/a;x/..`).
    let has_params = scan.has_params && path.contains(';');
    Ok(Normalized {
        path: Cow::Owned(path),
        has_params,
    })
}

struct Scan {
    /// Nothing to decode, merge or resolve: the path is already normal.
    simple: bool,
    has_params: bool,
}

/// Bytes the first pass must look at; any other byte is part of a plain name. One table
/// lookup per byte keeps the scan of an ordinary path about twice as fast as a `match`.
const SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = matches!(b, b'/' | b'%' | b'.' | b';' | b'\\') || is_control(b);
        i += 1;
    }
    t
};

/// One pass over the raw bytes: refuse what needs no decoding to refuse, and find out
/// whether the slow path (`rebuild`) is needed at all.
fn scan(bytes: &[u8]) -> Result<Scan, PathError> {
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut s = Scan {
        simple: true,
        has_params: false,
    };
    let mut seg_start = 1;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if !SPECIAL[usize::from(b)] {
            continue;
        }
        match b {
            b'/' => {
                s.simple &= i != seg_start;
                seg_start = i + 1;
            }
            b'%' => s.simple = false,
            // A dot segment, exactly "." or "..", needs resolving.
            b'.' if i == seg_start => s.simple &= !is_dot_or_empty(segment_at(bytes, i)),
            // Only the first `;` of a segment can follow a dot or empty prefix; an escape
            // before it (`%2e;`) is checked once decoded, in `rebuild`.
            b';' => {
                s.has_params = true;
                if is_dot_or_empty(&bytes[seg_start..i]) {
                    return Err(PathError::DotSegmentParams);
                }
            }
            b'\\' => return Err(PathError::Backslash),
            b if is_control(b) => return Err(PathError::ControlChar),
            _ => {}
        }
    }
    Ok(s)
}

/// The segment starting at `start`, up to the next `/`.
fn segment_at(bytes: &[u8], start: usize) -> &[u8] {
    let rest = &bytes[start..];
    let end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
    &rest[..end]
}

/// The slow path: decode, check and resolve segment by segment into one new string.
/// Bytes are copied as string slices, so raw UTF-8 comes out as it went in.
fn rebuild(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let mut ends_as_directory = false;
    for raw in path[1..].split('/') {
        let start = out.len();
        out.push('/');
        decode_segment(raw, &mut out)?;
        let seg = &out[start + 1..];
        check_decoded(seg)?;
        ends_as_directory = match seg {
            "" | "." => {
                out.truncate(start);
                true
            }
            ".." => {
                out.truncate(start);
                let parent = out.rfind('/').unwrap_or(0);
                out.truncate(parent);
                true
            }
            _ => false,
        };
    }
    if ends_as_directory || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Append `raw` with unreserved escapes decoded and the others upper-cased.
fn decode_segment(raw: &str, out: &mut String) -> Result<(), PathError> {
    let mut pieces = raw.split('%');
    // `split` yields at least one piece: the text before the first `%`.
    out.push_str(pieces.next().unwrap_or(""));
    for piece in pieces {
        let v = match piece.as_bytes() {
            [h, l, ..] => match (hex_val(*h), hex_val(*l)) {
                (Some(h), Some(l)) => h * 16 + l,
                _ => return Err(PathError::BadEscape),
            },
            _ => return Err(PathError::BadEscape),
        };
        push_escaped(v, out)?;
        // Both hex digits are ASCII, so byte 2 is a character boundary.
        out.push_str(&piece[2..]);
    }
    Ok(())
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn push_escaped(v: u8, out: &mut String) -> Result<(), PathError> {
    match v {
        b'/' | b'\\' => Err(PathError::EncodedSeparator),
        v if is_control(v) => Err(PathError::ControlChar),
        v if is_unreserved(v) => {
            out.push(char::from(v));
            Ok(())
        }
        v => {
            out.push('%');
            out.push(char::from(HEX_UPPER[usize::from(v >> 4)]));
            out.push(char::from(HEX_UPPER[usize::from(v & 15)]));
            Ok(())
        }
    }
}

/// The checks that need the decoded segment: `%2e%2e;x` is `..;x`, and `%25` followed by
/// hex digits (raw, or decoded from `%32%65`) is a second layer of encoding.
fn check_decoded(seg: &str) -> Result<(), PathError> {
    let b = seg.as_bytes();
    if let Some(semi) = b.iter().position(|&c| c == b';') {
        if is_dot_or_empty(&b[..semi]) {
            return Err(PathError::DotSegmentParams);
        }
    }
    for w in b.windows(5) {
        if let [b'%', b'2', b'5', h, l] = w {
            if let (Some(h), Some(l)) = (hex_val(*h), hex_val(*l)) {
                let v = h * 16 + l;
                if matches!(v, b'.' | b'/' | b'\\' | b';') || is_control(v) {
                    return Err(PathError::DoubleEncoded);
                }
            }
        }
    }
    Ok(())
}

/// `path` with every segment's `;params` removed: the path a servlet container matches.
/// Only for paths that `normalize` accepted (no segment is empty or dot before its `;`).
pub fn strip_params(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(seg.find(';').map_or(seg, |semi| &seg[..semi]));
    }
    out
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
    // `pad`, not `write_str`: `check-config`'s table lays the column out with `{:<30}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.text)
    }
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("path pattern {text:?} must start with /"));
        }
        // A `;params` path is served only if it picks the same route with its params
        // stripped, which a pattern containing `;` never would.
        if text.contains(';') {
            return Err(format!("path pattern {text:?} must not contain ;"));
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
    fn a_pattern_honours_width_and_alignment() {
        let p = PathPattern::parse("/users/**").unwrap();
        assert_eq!(format!("[{p:<12}]"), "[/users/**   ]");
        assert_eq!(format!("[{p:>12}]"), "[   /users/**]");
        assert_eq!(format!("[{p}]"), "[/users/**]");
    }

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

    fn err(path: &str) -> PathError {
        match normalize(path) {
            Ok(p) => panic!("{path:?} was accepted as {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn dot_or_empty_segments_with_params_are_refused() {
        for bad in [
            "/..;/admin",
            "/a/..;jsessionid=1/b",
            "/a/.;",
            "/a/.;x/b",
            "/;x/admin",
            "/a/;",
            "/a;b/;c",
            // Escapes are decoded first, as Jetty does.
            "/%2e%2e;x/admin",
            "/%2E;/a",
            "/.%2e;x",
            "/a/%2e;",
            // Also when the path needs other normalisation too.
            "//a/..;/b",
        ] {
            assert_eq!(err(bad), PathError::DotSegmentParams, "{bad}");
        }
        for (ok, want) in [
            ("/a;x", "/a;x"),
            ("/users/1;jsessionid=abc", "/users/1;jsessionid=abc"),
            ("/a/...;x", "/a/...;x"),
            ("/a/.x;y", "/a/.x;y"),
            ("/a;/b", "/a;/b"),
            ("/a/..b;c", "/a/..b;c"),
            ("/a;x//b/./c;y", "/a;x/b/c;y"),
            ("/a/%2e%2ex;y", "/a/..x;y"),
        ] {
            let n = normalize_request(ok).unwrap();
            assert_eq!(n.path, want, "{ok}");
            assert!(n.has_params, "{ok}");
        }
        assert!(matches!(
            normalize_request("/users/1;j=2").unwrap().path,
            Cow::Borrowed(_)
        ));
        assert!(!normalize_request("/users/1").unwrap().has_params);
        // `..` can drop the only segment with params (found by the property test).
        for gone in ["/a;x/..", "/%3b;/../"] {
            let n = normalize_request(gone).unwrap();
            assert_eq!((n.path.as_ref(), n.has_params), ("/", false), "{gone}");
        }
        // An encoded `;` is not a parameter delimiter, for keygate or a servlet container.
        let n = normalize_request("/a/..%3Bx").unwrap();
        assert_eq!((n.path.as_ref(), n.has_params), ("/a/..%3Bx", false));
    }

    #[test]
    fn control_characters_are_refused_raw_or_encoded() {
        for bad in [
            "/a%00", "/a%00b", "/a%0a", "/a%0D%0A", "/a%1f", "/a%1F", "/a%7f", "/a%7F", "/a\x01",
        ] {
            assert_eq!(err(bad), PathError::ControlChar, "{bad:?}");
        }
        assert_eq!(err("/a\u{7f}"), PathError::ControlChar);
        assert_eq!(err("/a/b\n"), PathError::ControlChar);
        assert_eq!(normalize("/a%20b").unwrap(), "/a%20b");
        assert_eq!(normalize("/a%80").unwrap(), "/a%80");
    }

    #[test]
    fn double_encoded_dots_and_separators_are_refused() {
        for bad in [
            "/%252e%252e/admin",
            "/a/%252E",
            "/a%252Fb",
            "/a%252fb",
            "/a%255c",
            "/a%255C",
            "/a%253b",
            "/a%2500",
            "/a%250A",
            // The hex digits may themselves be escaped: this decodes to `%252e`.
            "/a%25%32%65",
            "/a%25%32E",
        ] {
            assert_eq!(err(bad), PathError::DoubleEncoded, "{bad}");
        }
        // Other double escapes, and a lone encoded `%`, are harmless and kept.
        for (ok, want) in [
            ("/a%25", "/a%25"),
            ("/a%2541", "/a%2541"),
            ("/a%25zz", "/a%25zz"),
            ("/a%25/2e", "/a%25/2e"),
        ] {
            assert_eq!(normalize(ok).unwrap(), want, "{ok}");
        }
    }

    #[test]
    fn raw_utf8_survives_normalisation() {
        for (input, want) in [
            ("/café/./x", "/café/x"),
            ("/cafe\u{301}/..", "/"),
            ("/日本//語/", "/日本/語/"),
            ("/ünï/%7e/cödé", "/ünï/~/cödé"),
            ("/ß/%c3%a9", "/ß/%C3%A9"),
            ("/😀;x/./y", "/😀;x/y"),
        ] {
            assert_eq!(normalize(input).unwrap(), want, "{input}");
        }
        assert!(matches!(normalize("/café/x"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn strip_params_removes_each_segments_params() {
        for (input, want) in [
            ("/admin;x/secret", "/admin/secret"),
            ("/users/1;a=b;c", "/users/1"),
            ("/a;x/", "/a/"),
            ("/a/b", "/a/b"),
            ("/", "/"),
        ] {
            assert_eq!(strip_params(input), want, "{input}");
        }
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
        for bad in [
            "users", "/a/**/b", "/a*", "//a", "/a/../b", "/a%2Fb", "/a;b", "/a;/**",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }
}

/// Property tests: `normalize` sees every request path before anything else does.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Pieces that make hostile paths: dots, separators, params, escapes of every kind
    /// (also double and half escapes), raw UTF-8 and control characters.
    fn piece() -> impl Strategy<Value = String> {
        let pick = |pieces: &[&'static str]| {
            prop::sample::select(pieces.to_vec()).prop_map(str::to_string)
        };
        prop_oneof![
            // What normalisation is about, mostly accepted.
            6 => pick(&[
                "/", "/", "/", ".", "..", ";", ";x=1", "%2e", "%2E", "%3b", "%3B", "%41", "%7e",
                "%c3%a9", "%ff", "%25", "é", "日本", "😀", "\u{85}", "a", "b", "users", "admin",
                "2e", "32", "65", "~", "-", "*",
            ]),
            // What must be refused.
            1 => pick(&[
                "%", "%2f", "%5C", "%252e", "%252F", "%00", "%0a", "%7f", "\\", "?", "#", " ",
                "\t", "\u{0}", "\u{7f}", "%3", "%z",
            ]),
            1 => any::<char>().prop_map(String::from),
        ]
    }

    fn hostile_path() -> impl Strategy<Value = String> {
        (
            prop::bool::weighted(0.95),
            prop::collection::vec(piece(), 0..16),
        )
            .prop_map(|(rooted, pieces)| {
                let body = pieces.concat();
                if rooted {
                    format!("/{body}")
                } else {
                    body
                }
            })
    }

    /// `seg` is not a directory step for any server: not `.`, `..`, nor one of those (or
    /// nothing) before `;params`.
    fn is_a_name(seg: &str) -> bool {
        match seg.split_once(';') {
            Some((before_params, _)) => !is_dot_or_empty(before_params.as_bytes()),
            None => !matches!(seg, "." | ".."),
        }
    }

    fn check_output(input: &str, out: &str) -> Result<(), TestCaseError> {
        prop_assert!(out.starts_with('/'), "{:?} -> {:?}", input, out);
        prop_assert!(!out.contains("//"), "{:?} -> {:?}", input, out);
        let segs: Vec<&str> = out[1..].split('/').collect();
        for (i, seg) in segs.iter().enumerate() {
            // Empty only as the last segment (a trailing slash, or the root).
            prop_assert!(
                !seg.is_empty() || i == segs.len() - 1,
                "{:?} -> {:?}",
                input,
                out
            );
            prop_assert!(
                is_a_name(seg),
                "{:?} -> {:?}: segment {:?}",
                input,
                out,
                seg
            );
        }
        for seg in strip_params(out)[1..].split('/') {
            prop_assert!(!matches!(seg, "." | ".."), "{:?} -> {:?}", input, out);
        }
        prop_assert!(!out.bytes().any(is_control), "{:?} -> {:?}", input, out);
        // Every escape left is upper-case, of a byte that must stay encoded, and never a
        // separator, a control character or a second layer over one of those.
        let b = out.as_bytes();
        for (i, _) in out.match_indices('%') {
            let h = b.get(i + 1).copied().and_then(hex_val);
            let l = b.get(i + 2).copied().and_then(hex_val);
            let (Some(h), Some(l)) = (h, l) else {
                return Err(TestCaseError::fail(format!(
                    "{input:?} -> {out:?}: bad escape"
                )));
            };
            let v = h * 16 + l;
            prop_assert!(
                !b[i + 1..i + 3].iter().any(u8::is_ascii_lowercase),
                "{:?} -> {:?}",
                input,
                out
            );
            prop_assert!(
                !is_unreserved(v) && !is_control(v) && v != b'/' && v != b'\\',
                "{:?} -> {:?}",
                input,
                out
            );
        }
        for w in b.windows(5) {
            if let [b'%', b'2', b'5', h, l] = w {
                if let (Some(h), Some(l)) = (hex_val(*h), hex_val(*l)) {
                    let v = h * 16 + l;
                    prop_assert!(
                        !matches!(v, b'.' | b'/' | b'\\' | b';') && !is_control(v),
                        "{:?} -> {:?}",
                        input,
                        out
                    );
                }
            }
        }
        Ok(())
    }

    fn non_ascii(s: &str) -> Vec<char> {
        s.chars().filter(|c| !c.is_ascii()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn normalize_output_is_normal_and_idempotent(input in prop_oneof![hostile_path(), any::<String>()]) {
            let Ok(n) = normalize_request(&input) else { return Ok(()) };
            let out = n.path.as_ref();
            check_output(&input, out)?;
            // Normal already: normalising again changes nothing, and says the same of `;`.
            let again = normalize_request(out);
            prop_assert_eq!(again.as_ref().map(|a| a.path.as_ref()), Ok(out), "{:?}", input);
            prop_assert_eq!(again.map(|a| a.has_params), Ok(n.has_params));
            prop_assert_eq!(n.has_params, out.contains(';'));
            // Raw UTF-8 is copied, never re-encoded: what is left is a subsequence of what
            // came in (`..` may drop some).
            let (mut have, want) = (non_ascii(&input).into_iter(), non_ascii(out));
            prop_assert!(want.iter().all(|c| have.any(|h| h == *c)), "{:?} -> {:?}", input, out);
            // What keygate receives is a valid URI path; what it forwards must be one too.
            if let Ok(pq) = http::uri::PathAndQuery::try_from(input.as_str()) {
                if pq.path() == input {
                    let fwd = http::uri::PathAndQuery::try_from(out);
                    prop_assert!(fwd.is_ok(), "{:?} -> {:?}", input, out);
                    let fwd_path = fwd.map(|p| p.path().to_string()).ok();
                    prop_assert_eq!(fwd_path.as_deref(), Some(out));
                }
            }
        }

        #[test]
        fn raw_utf8_names_come_out_unchanged(
            names in prop::collection::vec("[a-zA-Z0-9é日本😀ßü~_-]{1,6}", 1..6),
            slashes in prop::collection::vec(1..3usize, 6),
        ) {
            prop_assume!(names.iter().all(|n| is_a_name(n)));
            let mut input = String::new();
            for (name, k) in names.iter().zip(&slashes) {
                input.push_str(&"/".repeat(*k));
                input.push_str(name);
            }
            input.push_str("/./");
            let want = format!("/{}/", names.join("/"));
            let got = normalize(&input).ok();
            prop_assert_eq!(got.as_deref(), Some(want.as_str()));
        }
    }
}
