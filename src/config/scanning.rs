//! The `secret_scanning` section: the report listener's address (never the proxy's or the
//! admin's), the scanner's P-256 public keys (parsed here, so a bad PEM stops the start),
//! the action and optional TLS.

use super::locate::FieldPath;
use super::raw::{RawScanKey, RawSecretScanning, ScanAction};
use super::sections::{invalid, overlaps, tls_pair, Result};
use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey;
use std::net::SocketAddr;
use std::path::PathBuf;

/// `secret_scanning`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretScanning {
    pub listen: SocketAddr,
    pub public_keys: Vec<ScanKey>,
    pub action: ScanAction,
    /// Certificate and key files of the listener's TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// One scanner key: what `GITHUB-PUBLIC-KEY-IDENTIFIER` names, and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanKey {
    pub identifier: String,
    pub key: VerifyingKey,
}

/// Longest key identifier (GitHub's are 64 hex digits).
const MAX_IDENTIFIER: usize = 256;

/// The section, checked against the proxy's and the admin's (resolved) addresses.
pub(super) fn validate(
    raw: Option<RawSecretScanning>,
    proxy: SocketAddr,
    admin: SocketAddr,
) -> Result<Option<SecretScanning>> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    for (addr, port) in [(proxy, "proxy"), (admin, "admin API")] {
        if overlaps(raw.listen, addr) {
            return Err(invalid(
                "secret_scanning.listen",
                format!("the report listener must not share the {port}'s address ({addr})"),
            ));
        }
    }
    if raw.public_keys.is_empty() {
        return Err(invalid(
            "secret_scanning.public_keys",
            "give at least one public key: reports are accepted only when signed",
        ));
    }
    let mut public_keys: Vec<ScanKey> = Vec::with_capacity(raw.public_keys.len());
    for (i, k) in raw.public_keys.iter().enumerate() {
        let key = scan_key(i, k)?;
        if let Some(first) = public_keys
            .iter()
            .position(|p| p.identifier == key.identifier)
        {
            return Err(invalid(
                key_field(i, "key_identifier"),
                format!(
                    "duplicate key identifier {:?} (also public_keys[{}])",
                    key.identifier,
                    first + 1
                ),
            ));
        }
        public_keys.push(key);
    }
    Ok(Some(SecretScanning {
        listen: raw.listen,
        public_keys,
        action: raw.action,
        tls: tls_pair("secret_scanning.tls", &raw.tls)?,
    }))
}

/// `secret_scanning.public_keys[i]` (`i` from 0; shown from 1).
fn key_field(i: usize, field: &str) -> FieldPath {
    FieldPath::keys("secret_scanning.public_keys")
        .index(i)
        .key(field)
}

fn scan_key(i: usize, raw: &RawScanKey) -> Result<ScanKey> {
    let id = &raw.key_identifier;
    // It is compared with a header value: visible ASCII only.
    if id.is_empty() || id.len() > MAX_IDENTIFIER || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            key_field(i, "key_identifier"),
            format!("use 1 to {MAX_IDENTIFIER} visible ASCII characters"),
        ));
    }
    let key = VerifyingKey::from_public_key_pem(raw.pem.trim()).map_err(|e| {
        invalid(
            key_field(i, "pem"),
            format!("not an ECDSA P-256 public key in PEM (-----BEGIN PUBLIC KEY-----): {e}"),
        )
    })?;
    Ok(ScanKey {
        identifier: id.clone(),
        key,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError, ScanAction};
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::{EncodePublicKey, LineEnding};

    /// The PEM of a P-256 public key made from `seed` (any nonzero byte).
    fn pem(seed: u8) -> String {
        let secret = SigningKey::from_slice(&[seed; 32]).expect("a valid scalar");
        secret
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("PEM encoding")
    }

    /// A block-style config with one scanner key per `(identifier, pem)`.
    fn config(listen: &str, keys: &[(&str, &str)]) -> String {
        let mut text = String::from(
            "proxy:\n  listen: 127.0.0.1:8080\n  upstream: http://127.0.0.1:3000\n\
             admin:\n  listen: 127.0.0.1:9901\nstore:\n  memory: {}\n\
             secret_scanning:\n",
        );
        text.push_str(&format!("  listen: {listen}\n  public_keys:\n"));
        for (id, pem) in keys {
            text.push_str(&format!("    - key_identifier: {id}\n      pem: |\n"));
            for line in pem.lines() {
                text.push_str(&format!("        {line}\n"));
            }
        }
        text
    }

    fn refused(text: &str) -> ConfigError {
        Config::from_yaml(text, "scan.yaml", &[("X", "Y")]).expect_err("refused")
    }

    #[test]
    fn a_good_section_loads_with_revoke_as_the_default_action() {
        let (a, b) = (pem(1), pem(2));
        let text = config("127.0.0.1:9902", &[("abc", &a), ("def", &b)]);
        let c = Config::from_yaml(&text, "scan.yaml", &[("X", "Y")]).expect("loads");
        let s = c.fixed.secret_scanning.expect("configured");
        assert_eq!(s.action, ScanAction::Revoke);
        assert_eq!(s.public_keys.len(), 2);
        assert_eq!(s.public_keys[1].identifier, "def");
        let report = text.replace("  public_keys:", "  action: report\n  public_keys:");
        let c = Config::from_yaml(&report, "scan.yaml", &[("X", "Y")]).expect("loads");
        assert_eq!(c.fixed.secret_scanning.unwrap().action, ScanAction::Report);
        // Absent: off.
        let off = text.split("secret_scanning:").next().unwrap();
        let c = Config::from_yaml(off, "scan.yaml", &[("X", "Y")]).expect("loads");
        assert!(c.fixed.secret_scanning.is_none());
    }

    #[test]
    fn a_bad_pem_names_its_file_line_and_field() {
        let good = pem(1);
        let bad = good.replacen('A', "B", 3).replacen("M", "!", 1);
        let e = refused(&config("127.0.0.1:9902", &[("a", &good), ("b", &bad)]));
        assert_eq!(e.field, "secret_scanning.public_keys[2].pem", "{e}");
        assert!(e.line.is_some(), "{e}");
        assert!(e.message.contains("P-256 public key"), "{e}");
        assert!(
            e.to_string().starts_with(&format!(
                "scan.yaml:{}: field `secret_scanning.public_keys[2].pem`",
                e.line.unwrap()
            )),
            "{e}"
        );
        // A private key where the public one belongs is refused too.
        let private =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----";
        let e = refused(&config("127.0.0.1:9902", &[("a", private)]));
        assert_eq!(e.field, "secret_scanning.public_keys[1].pem", "{e}");
    }

    #[test]
    fn a_duplicate_identifier_names_the_second() {
        let (a, b) = (pem(1), pem(2));
        let text = config(
            "127.0.0.1:9902",
            &[("same", &a), ("other", &b), ("same", &b)],
        );
        let e = refused(&text);
        assert_eq!(
            e.field, "secret_scanning.public_keys[3].key_identifier",
            "{e}"
        );
        let line = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains("key_identifier: same"))
            .nth(1)
            .map(|(i, _)| i + 1);
        assert_eq!(e.line, line, "{e}");
        assert!(e.message.contains("also public_keys[1]"), "{e}");
        let e = refused(&config("127.0.0.1:9902", &[("has space", &a)]));
        assert_eq!(
            e.field, "secret_scanning.public_keys[1].key_identifier",
            "{e}"
        );
    }

    #[test]
    fn the_listener_never_shares_the_admin_or_proxy_address() {
        let a = pem(1);
        for (listen, port) in [
            ("127.0.0.1:9901", "admin API"),
            ("0.0.0.0:9901", "admin API"),
            ("127.0.0.1:8080", "proxy"),
        ] {
            let text = config(listen, &[("a", &a)]);
            let e = refused(&text);
            assert_eq!(e.field, "secret_scanning.listen", "{e}");
            // The section's own `listen:`, on the line after `secret_scanning:`.
            let section = text.lines().position(|l| l == "secret_scanning:");
            let line = section.map(|i| i + 2);
            assert_eq!(e.line, line, "{e}");
            assert!(e.message.contains(port), "{e}");
        }
        let e = refused(
            &config("127.0.0.1:9902", &[]).replace("  public_keys:\n", "  public_keys: []\n"),
        );
        assert_eq!(e.field, "secret_scanning.public_keys", "{e}");
    }
}
