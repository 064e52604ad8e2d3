//! API key text (`<type prefix><40 base62 body><6 base62 CRC32>`), its parse-and-checksum
//! without I/O, the at-rest digest (SHA-256, or HMAC-SHA-256 with a pepper), and scopes.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;

/// Random body length in base62 characters: 40 * log2(62) = 238 bits of entropy.
pub const BODY_LEN: usize = 40;
/// Checksum length: CRC32 of prefix + body, base62, fixed width (62^6 > 2^32).
pub const CHECKSUM_LEN: usize = 6;
/// Characters of the body shown in the display prefix (after the type prefix).
pub const DISPLAY_BODY_CHARS: usize = 4;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A SHA-256 (or HMAC-SHA-256) digest of a key's full text: the only form stored.
pub type Digest = [u8; 32];

/// `secret` keys are for servers; `publishable` keys may sit in a browser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    Secret,
    Publishable,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Secret => "secret",
            KeyType::Publishable => "publishable",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "secret" => Some(KeyType::Secret),
            "publishable" => Some(KeyType::Publishable),
            _ => None,
        }
    }
}

/// `live` or `test`, carried in the key's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Test => "test",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Environment::Live),
            "test" => Some(Environment::Test),
            _ => None,
        }
    }
}

/// The four configured type prefixes. Validated in config so that none is a prefix of
/// another, which makes classification of a token unambiguous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefixes {
    pub secret_live: String,
    pub publishable_live: String,
    pub secret_test: String,
    pub publishable_test: String,
}

impl Default for Prefixes {
    fn default() -> Self {
        Prefixes {
            secret_live: "sk_live_".into(),
            publishable_live: "pk_live_".into(),
            secret_test: "sk_test_".into(),
            publishable_test: "pk_test_".into(),
        }
    }
}

impl Prefixes {
    pub fn get(&self, t: KeyType, e: Environment) -> &str {
        match (t, e) {
            (KeyType::Secret, Environment::Live) => &self.secret_live,
            (KeyType::Publishable, Environment::Live) => &self.publishable_live,
            (KeyType::Secret, Environment::Test) => &self.secret_test,
            (KeyType::Publishable, Environment::Test) => &self.publishable_test,
        }
    }

    fn all(&self) -> [(&str, KeyType, Environment); 4] {
        [
            (&self.secret_live, KeyType::Secret, Environment::Live),
            (
                &self.publishable_live,
                KeyType::Publishable,
                Environment::Live,
            ),
            (&self.secret_test, KeyType::Secret, Environment::Test),
            (
                &self.publishable_test,
                KeyType::Publishable,
                Environment::Test,
            ),
        ]
    }
}

/// A rate limit's name (a key's or a route's): a metric label and the `RateLimit` headers'
/// policy name, so 1-32 of `a-z 0-9 _ . -` starting with a letter or digit; `credits` is
/// the credits' own policy name.
pub fn valid_limit_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=32).contains(&b.len())
        && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
        })
        && name != "credits"
}

/// Why a token was refused before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("unknown key prefix")]
    Prefix,
    #[error("wrong key length")]
    Length,
    #[error("invalid character in key")]
    Charset,
    #[error("key checksum mismatch")]
    Checksum,
}

/// A token that passed the format and checksum checks.
#[derive(Clone, Copy)]
pub struct ParsedKey<'a> {
    pub text: &'a str,
    pub key_type: KeyType,
    pub environment: Environment,
    pub prefix_len: usize,
}

impl fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ParsedKey({}…)",
            display_prefix(self.text, self.prefix_len)
        )
    }
}

/// Check prefix, length, alphabet and checksum. Costs no I/O and no allocation.
pub fn parse<'a>(prefixes: &Prefixes, token: &'a str) -> Result<ParsedKey<'a>, KeyFormatError> {
    let (prefix, key_type, environment) = prefixes
        .all()
        .into_iter()
        .find(|(p, _, _)| token.starts_with(p))
        .ok_or(KeyFormatError::Prefix)?;
    let rest = &token.as_bytes()[prefix.len()..];
    if rest.len() != BODY_LEN + CHECKSUM_LEN {
        return Err(KeyFormatError::Length);
    }
    if !rest.iter().all(u8::is_ascii_alphanumeric) {
        return Err(KeyFormatError::Charset);
    }
    let (signed, sum) = token.as_bytes().split_at(token.len() - CHECKSUM_LEN);
    if checksum(signed) != *sum {
        return Err(KeyFormatError::Checksum);
    }
    Ok(ParsedKey {
        text: token,
        key_type,
        environment,
        prefix_len: prefix.len(),
    })
}

fn checksum(signed: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(signed) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// The alphabet of a legacy key's text after its prefix (`keys.legacy[].charset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Charset {
    /// `A-Z a-z 0-9 - _` (RFC 4648 §5, no padding).
    Base64url,
    /// `0-9 a-f A-F`.
    Hex,
    /// `A-Z a-z 0-9`.
    Alnum,
    /// RFC 9110's token68: `A-Z a-z 0-9 - . _ ~ + /`, then any number of `=`.
    Token68,
}

impl Charset {
    fn fits(self, body: &[u8]) -> bool {
        match self {
            Charset::Base64url => body
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')),
            Charset::Hex => body.iter().all(u8::is_ascii_hexdigit),
            Charset::Alnum => body.iter().all(u8::is_ascii_alphanumeric),
            Charset::Token68 => {
                let end = body.len() - body.iter().rev().take_while(|&&b| b == b'=').count();
                end > 0
                    && body[..end].iter().all(|&b| {
                        b.is_ascii_alphanumeric()
                            || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
                    })
            }
        }
    }
}

/// Shortest and longest key text import accepts, and so any legacy format (`keys.legacy`).
pub const LEGACY_LENGTHS: std::ops::RangeInclusive<usize> = 16..=512;

/// One accepted format of keys made before keygate (`keys.legacy[]`): the whole token's
/// length (prefix included) and the alphabet of what follows the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegacyFormat {
    pub name: String,
    pub prefix: String,
    pub min_length: usize,
    pub max_length: usize,
    pub charset: Charset,
}

impl LegacyFormat {
    /// Does `token` have this format? No I/O, no allocation.
    pub fn fits(&self, token: &str) -> bool {
        (self.min_length..=self.max_length).contains(&token.len())
            && token.starts_with(self.prefix.as_str())
            && self.charset.fits(&token.as_bytes()[self.prefix.len()..])
    }
}

/// The configured legacy formats (empty: only keygate's own keys are accepted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LegacyFormats(std::sync::Arc<[LegacyFormat]>);

impl LegacyFormats {
    pub fn new(formats: Vec<LegacyFormat>) -> Self {
        LegacyFormats(formats.into())
    }

    /// The first format `token` fits, if any. Checked only for tokens that start with no
    /// keygate prefix.
    pub fn find(&self, token: &str) -> Option<&LegacyFormat> {
        self.0.iter().find(|f| f.fits(token))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// How a token is looked up, decided without I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A keygate key (prefix, length, alphabet and checksum hold).
    Keygate,
    /// A key of a configured legacy format (imported).
    Legacy,
}

/// Classify `token`: a keygate key, one of `legacy`'s formats (only when it starts with
/// no keygate prefix), or malformed.
pub fn classify(
    prefixes: &Prefixes,
    legacy: &LegacyFormats,
    token: &str,
) -> Result<TokenKind, KeyFormatError> {
    match parse(prefixes, token) {
        Ok(_) => Ok(TokenKind::Keygate),
        Err(KeyFormatError::Prefix) if legacy.find(token).is_some() => Ok(TokenKind::Legacy),
        Err(e) => Err(e),
    }
}

/// Does `token` start with one of keygate's own prefixes? (Such a token is read as a
/// keygate key, never as a legacy one.)
pub fn has_keygate_prefix(prefixes: &Prefixes, token: &str) -> bool {
    prefixes.all().iter().any(|(p, _, _)| token.starts_with(p))
}

/// A freshly generated key. Its `Debug` shows only the display prefix.
pub struct NewKey {
    pub text: String,
    pub prefix_len: usize,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NewKey({}…)",
            display_prefix(&self.text, self.prefix_len)
        )
    }
}

impl NewKey {
    pub fn display_prefix(&self) -> String {
        display_prefix(&self.text, self.prefix_len).to_string()
    }
    pub fn last_four(&self) -> String {
        self.text[self.text.len() - 4..].to_string()
    }
}

/// Generate a key from the OS CSPRNG (uniform base62 by rejection sampling).
pub fn generate(
    prefixes: &Prefixes,
    key_type: KeyType,
    environment: Environment,
) -> Result<NewKey, getrandom::Error> {
    let prefix = prefixes.get(key_type, environment);
    let mut text = String::with_capacity(prefix.len() + BODY_LEN + CHECKSUM_LEN);
    text.push_str(prefix);
    let mut buf = [0u8; 64];
    let mut body = 0;
    while body < BODY_LEN {
        getrandom::fill(&mut buf)?;
        for &b in &buf {
            // 248 = 4 * 62: values at or above it would bias the modulo.
            if b < 248 && body < BODY_LEN {
                text.push(ALPHABET[(b % 62) as usize] as char);
                body += 1;
            }
        }
    }
    let sum = checksum(text.as_bytes());
    text.extend(sum.iter().map(|&b| char::from(b)));
    Ok(NewKey {
        text,
        prefix_len: prefix.len(),
    })
}

/// Type prefix plus the first few body characters: safe to show, log and store.
pub fn display_prefix(text: &str, prefix_len: usize) -> &str {
    &text[..(prefix_len + DISPLAY_BODY_CHARS).min(text.len())]
}

/// Computes at-rest digests. With a pepper the digest is HMAC-SHA-256, so a leaked
/// store dump cannot be used to confirm guessed keys without the server-side secret.
#[derive(Clone)]
pub struct KeyHasher {
    pepper: Option<Hmac<Sha256>>,
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyHasher")
            .field("peppered", &self.pepper.is_some())
            .finish()
    }
}

impl KeyHasher {
    pub fn new(pepper: Option<&[u8]>) -> Self {
        KeyHasher {
            pepper: pepper.map(|p| {
                <Hmac<Sha256> as Mac>::new_from_slice(p).expect("HMAC accepts keys of any length")
            }),
        }
    }

    /// With a pepper, `digest` differs from plain SHA-256.
    pub fn is_peppered(&self) -> bool {
        self.pepper.is_some()
    }

    pub fn digest(&self, key_text: &str) -> Digest {
        match &self.pepper {
            // Cloning the keyed state skips re-hashing the pepper on every call.
            Some(mac) => {
                let mut mac = mac.clone();
                mac.update(key_text.as_bytes());
                mac.finalize().into_bytes().into()
            }
            None => Sha256::digest(key_text.as_bytes()).into(),
        }
    }
}

/// Plain SHA-256, used for the root token so that comparing digests is length-independent.
pub fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// Constant-time equality for secrets and digests.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

pub fn hex(d: &Digest) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Digest> {
    if s.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        d[i] = (hi * 16 + lo) as u8;
    }
    Some(d)
}

/// Is `s` a tenant id: 1-64 of `[A-Za-z0-9_.-]`? (It appears in store keys and headers.)
pub fn valid_tenant(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Is `s` a well-formed scope: `*` or `[a-z0-9_.-]+(:[a-z0-9_.*-]+)*`?
pub fn valid_scope(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    if s.is_empty() || s.len() > 128 {
        return false;
    }
    let mut parts = s.split(':');
    let head = parts.next().unwrap_or("");
    let ok = |p: &str, star: bool| {
        !p.is_empty()
            && p.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'_' | b'.' | b'-')
                    || (star && b == b'*')
            })
    };
    ok(head, false) && parts.all(|p| ok(p, true))
}

/// Does a held scope grant a required one? `*` grants all; `users:*` grants `users:read`.
pub fn scope_grants(held: &str, required: &str) -> bool {
    if held == "*" || held == required {
        return true;
    }
    match held.strip_suffix('*') {
        Some(stem) if stem.ends_with(':') => required.starts_with(stem),
        _ => false,
    }
}

/// Does a set of held scopes grant every required one?
pub fn grants_all<H: AsRef<str>, R: AsRef<str>>(held: &[H], required: &[R]) -> bool {
    required
        .iter()
        .all(|r| held.iter().any(|h| scope_grants(h.as_ref(), r.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_typos_do_not() {
        let p = Prefixes::default();
        for (t, e) in [
            (KeyType::Secret, Environment::Live),
            (KeyType::Publishable, Environment::Test),
        ] {
            let k = generate(&p, t, e).unwrap();
            let parsed = parse(&p, &k.text).unwrap();
            assert_eq!((parsed.key_type, parsed.environment), (t, e));
            // Flip one body character: the checksum must catch it.
            let mut typo = k.text.clone().into_bytes();
            let i = p.get(t, e).len() + 3;
            typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(typo).unwrap();
            assert_eq!(parse(&p, &typo).unwrap_err(), KeyFormatError::Checksum);
        }
        assert_eq!(parse(&p, "nope").unwrap_err(), KeyFormatError::Prefix);
        assert_eq!(
            parse(&p, "sk_live_abc").unwrap_err(),
            KeyFormatError::Length
        );
        let bad = format!("sk_live_{}", "!".repeat(BODY_LEN + CHECKSUM_LEN));
        assert_eq!(parse(&p, &bad).unwrap_err(), KeyFormatError::Charset);
    }

    fn format(prefix: &str, min: usize, max: usize, charset: Charset) -> LegacyFormat {
        LegacyFormat {
            name: "old".into(),
            prefix: prefix.into(),
            min_length: min,
            max_length: max,
            charset,
        }
    }

    #[test]
    fn legacy_formats_check_length_prefix_and_alphabet() {
        let hex = format("acme_", 21, 37, Charset::Hex);
        assert!(hex.fits(&format!("acme_{}", "0a".repeat(8))));
        assert!(hex.fits(&format!("acme_{}", "F".repeat(32))));
        assert!(!hex.fits(&format!("acme_{}", "0".repeat(15))), "short");
        assert!(!hex.fits(&format!("acme_{}", "0".repeat(33))), "long");
        assert!(!hex.fits(&format!("acmf_{}", "0".repeat(16))), "prefix");
        assert!(!hex.fits(&format!("acme_{}g", "0".repeat(16))), "alphabet");
        let b64 = format("", 16, 64, Charset::Base64url);
        assert!(b64.fits("abcDEF0123456789-_xy"));
        assert!(!b64.fits("abcDEF0123456789+/xy"));
        assert!(!b64.fits("abcDEF0123456789==xy"));
        let alnum = format("", 16, 16, Charset::Alnum);
        assert!(alnum.fits("abcDEF0123456789"));
        assert!(!alnum.fits("abcDEF012345678-"));
        assert!(!alnum.fits("abcDEF0123456789x"));
        let t68 = format("t.", 16, 40, Charset::Token68);
        assert!(t68.fits("t.abc+/~-._0123456=="));
        assert!(t68.fits("t.abcdefghijklmnop"));
        assert!(!t68.fits("t.abc=def0123456789"), "= only at the end");
        assert!(!t68.fits("t.================"), "= alone");
        assert!(!t68.fits("t.abc def0123456789"));
        // Multi-byte text: lengths are bytes, and nothing panics on a char boundary.
        assert!(!b64.fits("ééééééééééééééééé"));
        assert!(!t68.fits("tééééééééééééééé"));
    }

    #[test]
    fn classification_prefers_keygate_prefixes() {
        let p = Prefixes::default();
        let legacy = LegacyFormats::new(vec![format("", 16, 64, Charset::Base64url)]);
        let k = generate(&p, KeyType::Secret, Environment::Live).unwrap();
        assert_eq!(classify(&p, &legacy, &k.text), Ok(TokenKind::Keygate));
        assert_eq!(
            classify(&p, &legacy, "legacy_0123456789abcdef"),
            Ok(TokenKind::Legacy)
        );
        // A keygate prefix with a bad checksum stays malformed, whatever the formats say.
        let bad = format!("sk_live_{}", "a".repeat(BODY_LEN + CHECKSUM_LEN));
        assert_eq!(classify(&p, &legacy, &bad), Err(KeyFormatError::Checksum));
        assert_eq!(classify(&p, &legacy, "short"), Err(KeyFormatError::Prefix));
        assert_eq!(
            classify(&p, &LegacyFormats::default(), "legacy_0123456789abcdef"),
            Err(KeyFormatError::Prefix)
        );
        assert!(has_keygate_prefix(&p, "pk_test_x") && !has_keygate_prefix(&p, "pk_x"));
    }

    #[test]
    fn keys_are_distinct_and_debug_hides_them() {
        let p = Prefixes::default();
        let a = generate(&p, KeyType::Secret, Environment::Live).unwrap();
        let b = generate(&p, KeyType::Secret, Environment::Live).unwrap();
        assert_ne!(a.text, b.text);
        let dbg = format!("{a:?}");
        assert!(!dbg.contains(&a.text[12..]), "{dbg}");
        assert_eq!(
            a.display_prefix().len(),
            "sk_live_".len() + DISPLAY_BODY_CHARS
        );
    }

    #[test]
    fn pepper_changes_the_digest() {
        let plain = KeyHasher::new(None).digest("x");
        let peppered = KeyHasher::new(Some(b"pepper")).digest("x");
        assert_ne!(plain, peppered);
        assert_eq!(plain, sha256(b"x"));
        assert_eq!(unhex(&hex(&peppered)), Some(peppered));
    }

    #[test]
    fn scopes() {
        for ok in [
            "*",
            "users:read",
            "keys:*",
            "a.b-c_d:e:f*",
            "audit-logs:read",
        ] {
            assert!(valid_scope(ok), "{ok}");
        }
        for bad in [
            "",
            "Users:read",
            "users:",
            ":read",
            "*:read",
            "a b",
            "users:re ad",
        ] {
            assert!(!valid_scope(bad), "{bad}");
        }
        assert!(scope_grants("*", "users:read"));
        assert!(scope_grants("users:*", "users:read"));
        assert!(!scope_grants("users:*", "usersx:read"));
        assert!(!scope_grants("users:read", "users:write"));
        assert!(grants_all(
            &["users:read", "keys:*"],
            &["keys:write", "users:read"]
        ));
        assert!(!grants_all(&["users:read"], &["users:read", "users:write"]));
    }
}

/// Property tests: `parse` sees whatever a client puts after `Bearer `.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn prefix_sets() -> [Prefixes; 2] {
        [
            Prefixes::default(),
            Prefixes {
                secret_live: "acme_sk_".into(),
                publishable_live: "acme_pk_".into(),
                secret_test: "acme_tsk_".into(),
                publishable_test: "acme_tpk_".into(),
            },
        ]
    }

    const KINDS: [(KeyType, Environment); 4] = [
        (KeyType::Secret, Environment::Live),
        (KeyType::Publishable, Environment::Live),
        (KeyType::Secret, Environment::Test),
        (KeyType::Publishable, Environment::Test),
    ];

    /// A key as `generate` could make it: any base62 body, its checksum.
    fn valid_key() -> impl Strategy<Value = (usize, usize, String)> {
        (
            0..2usize,
            0..4usize,
            proptest::collection::vec(0..62usize, BODY_LEN),
        )
            .prop_map(|(set, kind, body)| {
                let (t, e) = KINDS[kind];
                let mut text = prefix_sets()[set].get(t, e).to_string();
                text.extend(body.iter().map(|&i| char::from(ALPHABET[i])));
                let sum = checksum(text.as_bytes());
                text.extend(sum.iter().map(|&b| char::from(b)));
                (set, kind, text)
            })
    }

    /// Near-keys: a real prefix (or not) followed by text of about the right length.
    fn near_key() -> impl Strategy<Value = String> {
        (
            prop_oneof![
                Just(""),
                Just("sk_live_"),
                Just("pk_test_"),
                Just("sk_live"),
                Just("acme_sk_")
            ],
            proptest::string::string_regex("[0-9A-Za-z_!é -]{0,60}").expect("a valid regex"),
        )
            .prop_map(|(p, rest)| format!("{p}{rest}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn parse_never_panics_and_accepts_only_well_formed_keys(
            text in prop_oneof![any::<String>(), near_key()]
        ) {
            for p in &prefix_sets() {
                if let Ok(k) = parse(p, &text) {
                    // Only a known prefix, the exact length, base62 and a matching checksum.
                    let prefix = p.get(k.key_type, k.environment);
                    prop_assert!(text.starts_with(prefix));
                    prop_assert_eq!(text.len(), prefix.len() + BODY_LEN + CHECKSUM_LEN);
                    prop_assert!(text[prefix.len()..].bytes().all(|b| b.is_ascii_alphanumeric()));
                    let (signed, sum) = text.as_bytes().split_at(text.len() - CHECKSUM_LEN);
                    prop_assert_eq!(&checksum(signed)[..], sum);
                }
            }
        }

        #[test]
        fn a_legacy_format_accepts_only_its_length_prefix_and_alphabet(
            text in prop_oneof![any::<String>(), near_key(), "[0-9a-f]{10,40}", "acme_[A-Za-z0-9+/=_~.-]{8,40}"],
            charset in prop::sample::select(vec![Charset::Base64url, Charset::Hex, Charset::Alnum, Charset::Token68]),
            prefix in prop::sample::select(vec!["", "acme_", "sk_live_"]),
            (lo, hi) in (16..40usize, 0..10usize).prop_map(|(lo, d)| (lo, lo + d)),
        ) {
            let f = LegacyFormat { name: "p".into(), prefix: prefix.into(), min_length: lo, max_length: hi, charset };
            if f.fits(&text) {
                prop_assert!((lo..=hi).contains(&text.len()) && text.starts_with(prefix));
                let body = &text.as_bytes()[prefix.len()..];
                prop_assert!(body.iter().all(|b| b.is_ascii_graphic()));
                if charset == Charset::Hex {
                    prop_assert!(body.iter().all(u8::is_ascii_hexdigit));
                }
            }
        }

        #[test]
        fn every_key_generation_can_make_parses(key in valid_key()) {
            let (set, kind, text) = key;
            let p = &prefix_sets()[set];
            let parsed = parse(p, &text);
            prop_assert!(parsed.is_ok(), "{:?}", parsed);
            if let Ok(k) = parsed {
                prop_assert_eq!((k.key_type, k.environment), KINDS[kind]);
                prop_assert_eq!(k.prefix_len, p.get(k.key_type, k.environment).len());
            }
        }

        #[test]
        fn a_one_character_change_is_refused(
            key in valid_key(),
            at in any::<prop::sample::Index>(),
            other in any::<char>(),
            op in 0..3u8,
        ) {
            let (set, _, text) = key;
            let chars: Vec<char> = text.chars().collect();
            let i = at.index(chars.len());
            let mut changed = chars.clone();
            match op {
                0 if other != chars[i] => changed[i] = other,
                0 => return Ok(()),
                1 => { changed.remove(i); }
                _ => changed.insert(i, other),
            }
            let changed: String = changed.into_iter().collect();
            prop_assert!(parse(&prefix_sets()[set], &changed).is_err(), "{} accepted", changed);
        }
    }

    #[test]
    fn generated_keys_always_parse() {
        for p in &prefix_sets() {
            for (t, e) in KINDS {
                for _ in 0..250 {
                    let k = generate(p, t, e).expect("OS randomness");
                    let parsed = parse(p, &k.text).expect("a generated key parses");
                    assert_eq!((parsed.key_type, parsed.environment), (t, e));
                }
            }
        }
    }
}
