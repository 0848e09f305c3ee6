//! The HTTPS option for the listener (`tls_cert`, `tls_key`), with rustls.
//!
//! The certificate and key are read when the config is read, so `check` catches a bad pair,
//! and again on every reload: replacing the files and sending SIGHUP (or touching the config)
//! rotates the certificate without a restart. Connections already open keep theirs.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// A problem with the certificate or key: which setting it is about, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct TlsError {
    /// `tls_cert` or `tls_key`.
    pub setting: &'static str,
    pub message: String,
}

impl TlsError {
    fn new(setting: &'static str, message: impl Into<String>) -> TlsError {
        TlsError {
            setting,
            message: message.into(),
        }
    }
}

/// Largest PEM file read for `tls_cert` or `tls_key`.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// The listener's TLS settings: file names as written, and what they held when last read.
#[derive(Clone)]
pub struct TlsSettings {
    /// As written; relative paths are relative to the config file's directory.
    pub cert: String,
    pub key: String,
    /// Built by [`TlsSettings::load`]; `None` only in a config parsed from text alone.
    pub server: Option<Arc<ServerConfig>>,
    /// SHA-256 over both files, so a reload notices a rotated certificate.
    pub sha256: String,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("loaded", &self.server.is_some())
            .finish()
    }
}

impl TlsSettings {
    pub fn new(cert: String, key: String) -> TlsSettings {
        TlsSettings {
            cert,
            key,
            server: None,
            sha256: String::new(),
        }
    }

    /// Reads both files (relative to `config_dir`) and builds the rustls server config.
    pub fn load(&mut self, config_dir: &Path) -> Result<(), TlsError> {
        let cert_pem = read_pem("tls_cert", &config_dir.join(&self.cert))?;
        let key_pem = read_pem("tls_key", &config_dir.join(&self.key))?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::new("tls_cert", format!("not a PEM certificate: {e}")))?;
        if certs.is_empty() {
            return Err(TlsError::new(
                "tls_cert",
                format!("{} holds no CERTIFICATE block", self.cert),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            TlsError::new(
                "tls_key",
                format!("no PEM private key in {}: {e}", self.key),
            )
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new("tls_cert", format!("TLS setup: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                TlsError::new(
                    "tls_key",
                    format!("the key does not fit the certificate: {e}"),
                )
            })?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut digest = Sha256::new();
        digest.update(&cert_pem);
        digest.update([0]);
        digest.update(&key_pem);
        self.sha256 = hex::encode(digest.finalize());
        self.server = Some(Arc::new(server));
        Ok(())
    }
}

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .map_err(|e| TlsError::new(key, format!("cannot read {}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| TlsError::new(key, format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::new(
            key,
            format!("{} is larger than {MAX_PEM_BYTES} bytes", path.display()),
        ));
    }
    Ok(bytes)
}
