//! Device keys and TLS between peers.
//!
//! Every device has a self-signed certificate; its fingerprint (BLAKE3 of the DER) is the
//! device key the hub vouches for. Peers do not use certificate authorities: a client accepts
//! a server only if its certificate has the fingerprint the hub gave for the device it meant
//! to reach, and a server accepts a client only if its fingerprint belongs to a device the hub
//! vouched for. Both sides prove they hold the key through the TLS handshake signature.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DistinguishedName, SignatureScheme};

use crate::AgentError;
use crate::peers::Contacts;

/// This device's certificate and private key.
#[derive(Clone)]
pub struct DeviceIdentity {
    cert: CertificateDer<'static>,
    key: Arc<Vec<u8>>,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("key", &self.fingerprint())
            .finish()
    }
}

/// The fingerprint of a certificate: BLAKE3 of its DER, hex.
pub fn fingerprint(cert: &[u8]) -> String {
    blake3::hash(cert).to_hex().to_string()
}

const CERT_FILE: &str = "device-cert.der";
const KEY_FILE: &str = "device-key.der";

impl DeviceIdentity {
    /// A new random identity (not saved).
    pub fn generate() -> Result<DeviceIdentity, AgentError> {
        let made = rcgen::generate_simple_self_signed(vec!["shoal-device".to_owned()])
            .map_err(|e| AgentError::Config(format!("cannot make a device key: {e}")))?;
        Ok(DeviceIdentity {
            cert: made.cert.der().clone(),
            key: Arc::new(made.signing_key.serialize_der()),
        })
    }

    /// Loads the identity kept in `dir`, making and saving one the first time.
    pub fn load_or_create(dir: &Path) -> Result<DeviceIdentity, AgentError> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        match (std::fs::read(&cert_path), std::fs::read(&key_path)) {
            (Ok(cert), Ok(key)) => Ok(DeviceIdentity {
                cert: CertificateDer::from(cert),
                key: Arc::new(key),
            }),
            _ => {
                let identity = DeviceIdentity::generate()?;
                write_private(&key_path, &identity.key)?;
                write_private(&cert_path, &identity.cert)?;
                Ok(identity)
            }
        }
    }

    /// The device key: the certificate's fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.as_ref().clone()))
    }

    /// TLS settings for calling a peer whose device key must be `expected`.
    pub(crate) fn client_config(&self, expected: &str) -> Result<rustls::ClientConfig, AgentError> {
        let provider = provider();
        let verifier = PinnedServer {
            expected: expected.to_owned(),
            algorithms: provider.signature_verification_algorithms,
        };
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(vec![self.cert.clone()], self.private_key())
            .map_err(tls_error)
    }

    /// TLS settings for serving peers: a client must present a key in `vouched`.
    pub(crate) fn server_config(
        &self,
        vouched: Arc<RwLock<Contacts>>,
    ) -> Result<rustls::ServerConfig, AgentError> {
        let provider = provider();
        let verifier = VouchedClients {
            vouched,
            algorithms: provider.signature_verification_algorithms,
        };
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(vec![self.cert.clone()], self.private_key())
            .map_err(tls_error)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| AgentError::Io(temp.clone(), e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| AgentError::Io(temp.clone(), e))?;
    std::fs::rename(&temp, path).map_err(|e| AgentError::Io(path.to_path_buf(), e))
}

fn tls_error(error: rustls::Error) -> AgentError {
    AgentError::Config(format!("TLS: {error}"))
}

/// The one crypto provider, named explicitly in every config we build.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client of the peer at `address` that must show the device key `expected`, as `identity`.
pub fn peer_client(
    address: &str,
    identity: &DeviceIdentity,
    expected: &str,
) -> Result<shoal_client::HubClient, AgentError> {
    Ok(shoal_client::HubClient::for_peer(
        address,
        identity.client_config(expected)?,
    )?)
}

fn end_entity_key(cert: &CertificateDer<'_>) -> String {
    fingerprint(cert)
}

#[derive(Debug)]
struct PinnedServer {
    expected: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity_key(end_entity) == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct VouchedClients {
    vouched: Arc<RwLock<Contacts>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for VouchedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = end_entity_key(end_entity);
        let known = self
            .vouched
            .read()
            .map(|c| c.by_key(&key).is_some())
            .unwrap_or(false);
        if known {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(%key, "refused a peer whose key the hub has not vouched for");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The key of the certificate a TLS connection's peer presented.
pub(crate) fn peer_key(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certs.and_then(|c| c.first()).map(end_entity_key)
}
