//! TLS for the QUIC endpoint.
//!
//! Without [`TlsConfig`], every node makes a fresh self-signed certificate at start. The
//! certificate only gives the connection its encryption; who the peer is gets proven afterwards
//! by the cookie handshake (see [`super::handshake`]), which binds an HMAC of the shared cookie to
//! this very TLS session.
//!
//! With [`TlsConfig`] (mutual TLS), both sides must present a certificate chain signed by the
//! cluster CA, checked by rustls's WebPKI verifiers, before the cookie handshake even starts.
//! By default the names in the certificates are not checked: membership of the cluster is what
//! the CA says. With [`TlsConfig::require_node_names`], each node's certificate must also carry
//! its node name (as a DNS subject alternative name), so that a node can claim no name but its
//! own.
//! Every config is built with the `ring` provider explicitly, never the process default, so a
//! second crypto provider elsewhere in the program cannot make it panic.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;

use crate::{Error, Result};

/// Mutual TLS with a cluster CA: every node presents a certificate chain signed by the CA and
/// accepts only peers that do. Pass it to [`crate::NodeBuilder::tls`]. The cookie handshake
/// still runs on top (with the default cookie unless one is set).
pub struct TlsConfig {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    node_names: bool,
}

impl Clone for TlsConfig {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            node_names: self.node_names,
        }
    }
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_certificates", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("node_names", &self.node_names)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads PEM files: the CA certificate(s), this node's certificate chain, its private key.
    pub fn from_pem_files(
        ca: impl AsRef<std::path::Path>,
        cert: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
    ) -> Result<Self> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Error::Tls(format!("cannot read {}: {e}", p.display())))
        };
        Self::from_pem(
            &read(ca.as_ref())?,
            &read(cert.as_ref())?,
            &read(key.as_ref())?,
        )
    }

    /// Parses PEM data: the CA certificate(s), this node's certificate chain, its private key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let certs = |pem: &[u8], what: &str| -> Result<Vec<CertificateDer<'static>>> {
            let v = CertificateDer::pem_slice_iter(pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::Tls(format!("bad {what} PEM: {e}")))?;
            if v.is_empty() {
                return Err(Error::Tls(format!("no certificate in the {what} PEM")));
            }
            Ok(v)
        };
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| Error::Tls(format!("bad private key PEM: {e}")))?;
        Ok(Self {
            ca: certs(ca, "CA")?,
            chain: certs(cert, "certificate")?,
            key,
            node_names: false,
        })
    }

    /// Also require every node's certificate to name that node: the node name must be one of
    /// the certificate's DNS subject alternative names (so node names must be valid DNS names,
    /// such as `node-1` or `node-1.cluster.example`). A peer whose certificate does not name the
    /// node it claims to be is refused with the `AUTH` close code, after the CA and cookie
    /// checks; this node's own certificate is checked at [`crate::NodeBuilder::start`].
    ///
    /// Without it, any holder of a certificate the CA signed may use any node name, including a
    /// live node's (and so replace that node's connection). Use it with per-node certificates;
    /// every node of a cluster should agree on it.
    pub fn require_node_names(mut self) -> Self {
        self.node_names = true;
        self
    }

    /// Whether [`TlsConfig::require_node_names`] is on.
    pub fn requires_node_names(&self) -> bool {
        self.node_names
    }

    /// Checks that this node's own certificate names it, when names are required.
    pub(crate) fn check_own_name(&self, name: &str) -> Result<()> {
        match self.chain.first() {
            Some(leaf) if self.node_names => names_node(leaf, name).map_err(|why| {
                Error::Tls(format!(
                    "this node's certificate does not name it ({name}), and require_node_names is on: {why}"
                ))
            }),
            _ => Ok(()),
        }
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(tls_err)?;
        }
        Ok(Arc::new(roots))
    }
}

/// Whether the certificate `leaf` carries `node` as a DNS subject alternative name; the reason
/// if not.
pub(crate) fn names_node(leaf: &CertificateDer<'_>, node: &str) -> std::result::Result<(), String> {
    let name = ServerName::try_from(node)
        .map_err(|_| format!("the node name {node:?} is not a DNS name"))?;
    if !matches!(name, ServerName::DnsName(_)) {
        return Err(format!("the node name {node:?} is not a DNS name"));
    }
    let cert =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("bad certificate: {e}"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("{node} is not among the certificate's DNS names"))
}

/// Server name every node presents and every client asks for.
pub(crate) const SERVER_NAME: &str = "cets";
/// ALPN protocol id; a peer speaking something else fails the TLS handshake.
const ALPN: &[u8] = b"cets/1";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

/// The server and client crypto configs of one node.
pub(crate) fn configs(mtls: Option<&TlsConfig>) -> Result<(QuicServerConfig, QuicClientConfig)> {
    if let Some(t) = mtls {
        return mutual_configs(t);
    }
    let certified =
        rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).map_err(tls_err)?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));

    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(tls_err)?;
    server.alpn_protocols = vec![ALPN.to_vec()];

    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];

    Ok((
        QuicServerConfig::try_from(server).map_err(tls_err)?,
        QuicClientConfig::try_from(client).map_err(tls_err)?,
    ))
}

fn mutual_configs(t: &TlsConfig) -> Result<(QuicServerConfig, QuicClientConfig)> {
    let roots = t.roots()?;
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(tls_err)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(t.chain.clone(), t.key.clone_key())
        .map_err(tls_err)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let server_verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(tls_err)?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CaOnly(server_verifier)))
        .with_client_auth_cert(t.chain.clone(), t.key.clone_key())
        .map_err(tls_err)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok((
        QuicServerConfig::try_from(server).map_err(tls_err)?,
        QuicClientConfig::try_from(client).map_err(tls_err)?,
    ))
}

/// Checks the server's chain against the cluster CA, but not the name in it: nodes dial
/// addresses, and the CA alone decides who belongs to the cluster.
#[derive(Debug)]
struct CaOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(NotValidForName))
            | Err(rustls::Error::InvalidCertificate(NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Accepts any server certificate but still checks the handshake signature, so the session
/// keys belong to whoever holds the certificate's key. Authentication is the cookie proof.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

/// The verifier of [`AnyCertificate`], for the raw QUIC clients of tests and benches
/// (`cets::testing::any_certificate`).
#[cfg(feature = "testing")]
pub(crate) fn any_certificate() -> Arc<dyn ServerCertVerifier> {
    Arc::new(AnyCertificate(provider()))
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
