//! TLS termination (`[tls]` in the configuration): rustls with the ring provider,
//! TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
//!
//! The certificate chain and key are read from PEM files at startup; a pair that
//! cannot be used (missing file, no certificate, no key, a key that does not match
//! the certificate) stops the start with an error naming the file. They are read
//! again on SIGHUP (see [`crate::app::serve`]) and, when `tls.watch_interval_secs`
//! is set, whenever either file changes: the new pair is swapped into the
//! [`Certificates`] resolver, so new handshakes present it while connections
//! already open keep theirs. A pair that fails to load at a reload is logged and
//! counted (`roomcast_tls_reloads_total{result="error"}`), and the old pair stays
//! in service.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    crypto::{ring, CryptoProvider},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::settings::TlsSettings;

/// ALPN protocols offered, most preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate file {0} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)")]
    NoCertificate(PathBuf),
    #[error("key file {path} holds no usable private key: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the key in {key} does not belong to the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The certificate every new handshake gets; swapped by [`Tls::reload`].
#[derive(Debug)]
pub struct Certificates {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The server's TLS: its acceptor and the files it reloads from.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    certificates: Arc<Certificates>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl Tls {
    /// Loads the configured pair; `None` when TLS is not configured.
    pub fn from_settings(settings: &TlsSettings) -> Result<Option<Self>, TlsError> {
        if settings.cert_file.is_empty() {
            return Ok(None);
        }
        Self::load(
            Path::new(&settings.cert_file),
            Path::new(&settings.key_file),
        )
        .map(Some)
    }

    /// Loads `cert_file` and `key_file` and builds the server configuration.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let key = load_pair(cert_file, key_file)?;
        let certificates = Arc::new(Certificates {
            current: RwLock::new(Arc::new(key)),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certificates,
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
        })
    }

    /// What accepts TLS connections.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Reads the files again and serves the new pair to new connections; on
    /// error the old pair stays. Logged and counted either way.
    pub fn reload(&self) -> Result<(), TlsError> {
        let result = load_pair(&self.cert_file, &self.key_file);
        let metrics = crate::metrics::metrics();
        match result {
            Ok(key) => {
                *self
                    .certificates
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
                metrics.tls_reloaded(true);
                tracing::info!(
                    cert_file = %self.cert_file.display(),
                    "TLS certificate reloaded; new connections get it"
                );
                Ok(())
            }
            Err(e) => {
                metrics.tls_reloaded(false);
                tracing::error!(
                    error = %e,
                    "TLS certificate reload failed; still serving the previous certificate"
                );
                Err(e)
            }
        }
    }

    /// Reloads whenever either file's size or modification time changes, looking
    /// every `interval`. Runs until the process ends.
    pub async fn watch(self, interval: Duration) {
        let mut seen = self.stamp();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = self.stamp();
            if now != seen {
                seen = now;
                // A failure is logged and counted; the next change tries again
                // (a certificate renewed in two writes is picked up after the
                // second).
                let _ = self.reload();
            }
        }
    }

    fn stamp(&self) -> [Option<(SystemTime, u64)>; 2] {
        let stamp = |path: &Path| {
            std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        [stamp(&self.cert_file), stamp(&self.key_file)]
    }
}

/// rustls with ring, no other provider compiled in.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Reads and checks one certificate chain and its key.
fn load_pair(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what: "certificate",
            path: cert_file.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_file.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Key {
            path: key_file.to_owned(),
            reason: "no `-----BEGIN PRIVATE KEY-----` (PKCS#8), RSA or EC key found".into(),
        },
        source => TlsError::Read {
            what: "key",
            path: key_file.to_owned(),
            source,
        },
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: key_file.to_owned(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e) => Err(TlsError::Mismatch {
            cert: cert_file.to_owned(),
            key: key_file.to_owned(),
            reason: e.to_string(),
        }),
    }
}
