//! Key text, as a client sends it after `Bearer `: `parse` must never panic, and what it
//! accepts must be a known prefix, the exact length and base62 only.
#![no_main]

use keygate::key::{self, Prefixes, BODY_LEN, CHECKSUM_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let p = Prefixes::default();
    if let Ok(k) = key::parse(&p, text) {
        let prefix = p.get(k.key_type, k.environment);
        assert!(text.starts_with(prefix));
        assert_eq!(text.len(), prefix.len() + BODY_LEN + CHECKSUM_LEN);
        assert!(text[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric()));
    }
});
