//! `Authorization` headers: up to three values, split at `\n`. `bearer` must never panic,
//! and a token it returns is the one value's text after `Bearer `, trimmed and non-empty.
#![no_main]

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use keygate::auth::bearer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for value in data.split(|&b| b == b'\n').take(3) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(AUTHORIZATION, v);
        }
    }
    if let Ok(token) = bearer(&headers) {
        let values: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(values.len(), 1);
        let value = values[0].to_str().expect("bearer accepted it").trim();
        assert!(value.ends_with(token) && !token.is_empty() && token.trim() == token);
        let scheme = value[..value.len() - token.len()].trim_end();
        assert!(scheme.eq_ignore_ascii_case("bearer"), "{value:?}");
    }
});
