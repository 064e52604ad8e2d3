//! TLS for the proxy listener (rustls, ring): PEM certificate chain and key, ALPN `h2`
//! and `http/1.1`, and the certificate reloaded when its files change (a bad new pair
//! is refused and the running one kept).

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// Load a PEM chain and key into a rustls signing key, with errors naming the file.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate found", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| format!("{} and {} do not match: {e}", cert.display(), key.display()))?;
    Ok(certified)
}

/// A root store from a PEM CA file.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?
    {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(roots)
}

/// Client TLS for an `https://` upstream: the CA file's roots, else the system's.
pub fn upstream_client_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let roots = match ca {
        Some(path) => load_roots(path)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            roots
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // ALPN is left to the connector (it offers http/1.1).
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Serves the current certificate; `reload` swaps it atomically.
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
    cert: PathBuf,
    key: PathBuf,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl CertResolver {
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, String> {
        let pair = load_pair(&cert, &key)?;
        Ok(CertResolver {
            current: ArcSwap::from_pointee(pair),
            cert,
            key,
        })
    }

    pub fn reload(&self) -> Result<(), String> {
        let pair = load_pair(&self.cert, &self.key)?;
        self.current.store(Arc::new(pair));
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A rustls server config using `resolver`, offering HTTP/2 and HTTP/1.1.
pub fn server_config(resolver: Arc<CertResolver>) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Reload the certificate when files in its directory change, until `shutdown`.
pub async fn watch_cert(resolver: Arc<CertResolver>, mut shutdown: watch::Receiver<bool>) {
    let mut dirs: Vec<PathBuf> = [&resolver.cert, &resolver.key]
        .iter()
        .map(|p| crate::watch::dir_of(p))
        .collect();
    dirs.dedup();
    let mut changes = match crate::watch::watch_files(&dirs, None) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the TLS certificate; it will not be reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            Some(()) = changes.next() => {
                match resolver.reload() {
                    Ok(()) => tracing::info!(cert = %resolver.cert.display(), "TLS certificate reloaded"),
                    Err(e) => tracing::warn!(error = %e, "TLS certificate reload refused; keeping the current one"),
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}
