//! Config text: `from_yaml` must never panic, and a refusal must say why.
#![no_main]

use keygate::config::Config;
use libfuzzer_sys::fuzz_target;

const ENV: [(&str, &str); 2] = [
    ("KEYGATE_ROOT_TOKEN", "0123456789abcdef0123"),
    ("KEYGATE_PEPPER", "pepper-pepper-pepper"),
];

fuzz_target!(|text: &str| {
    if let Err(e) = Config::from_yaml(text, "fuzz.yaml", &ENV) {
        assert!(!e.message.trim().is_empty(), "no message: {e:?}");
    }
});
