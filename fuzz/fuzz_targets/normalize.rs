//! Request paths: `normalize` must never panic, and what it accepts must come out normal
//! (idempotent, no `//`, no dot or empty-before-`;` segment) and still a valid URI path.
#![no_main]

use keygate::policy::path::{normalize, normalize_request, strip_params};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let Ok(n) = normalize_request(input) else {
        return;
    };
    let out = n.path.as_ref();
    assert!(
        out.starts_with('/') && !out.contains("//"),
        "{input:?} -> {out:?}"
    );
    assert_eq!(
        normalize(out).as_deref(),
        Ok(out),
        "not idempotent: {input:?}"
    );
    assert_eq!(n.has_params, out.contains(';'), "{input:?} -> {out:?}");
    for seg in out[1..].split('/') {
        let before_params = seg.split(';').next().unwrap_or(seg);
        assert!(!matches!(seg, "." | ".."), "{input:?} -> {out:?}");
        assert!(
            !(seg.contains(';') && matches!(before_params, "" | "." | "..")),
            "{input:?} -> {out:?}"
        );
    }
    for seg in strip_params(out)[1..].split('/') {
        assert!(!matches!(seg, "." | ".."), "{input:?} -> {out:?}");
    }
    let lower = out.to_ascii_lowercase();
    for bad in ["%2f", "%5c", "%00", "%0a", "%0d", "%252e", "%252f", "%255c"] {
        assert!(!lower.contains(bad), "{input:?} -> {out:?}");
    }
    if let Ok(pq) = http::uri::PathAndQuery::try_from(input) {
        if pq.path() == input {
            let fwd = http::uri::PathAndQuery::try_from(out).expect("forwardable");
            assert_eq!(fwd.path(), out);
        }
    }
});
