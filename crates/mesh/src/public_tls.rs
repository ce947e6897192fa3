//! The gateway's public certificate (`TESSERA_PUBLIC_TLS_DIR`): server-only TLS for internet
//! clients, from a certificate for the public DNS name (a cert-manager Certificate from a
//! public issuer, say), kept apart from the mesh certificate, which names a SPIFFE id that
//! no browser or grpcurl verifies. Re-read when the files change, like the mesh certificate:
//! new handshakes get the new certificate, live connections keep theirs.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

use crate::tls::{TlsError, provider};

/// `tls.crt` (the chain, leaf first) and `tls.key` in a directory: a cert-manager Secret.
/// `ca.crt`, if there, is not needed: clients verify against their own roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicTlsFiles {
    /// The certificate chain in PEM, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key in PEM.
    pub key: PathBuf,
}

impl PublicTlsFiles {
    /// The files at their cert-manager names in `dir`; nothing is read yet.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }
}

struct Built {
    config: Arc<ServerConfig>,
    stamp: Vec<u8>,
}

/// A public server certificate, rebuilt from its files when they change.
#[derive(Clone)]
pub struct PublicTls {
    files: Arc<PublicTlsFiles>,
    built: Arc<ArcSwap<Built>>,
}

impl PublicTls {
    /// Reads and checks the files now: both present, PEM, and the key matching the leaf.
    pub fn load(files: PublicTlsFiles) -> Result<Self, TlsError> {
        let built = build(&files, read_both(&files)?)?;
        Ok(Self {
            files: Arc::new(files),
            built: Arc::new(ArcSwap::from_pointee(built)),
        })
    }

    /// Like [`PublicTls::load`], then polls the files every `interval` (Kubernetes swaps
    /// Secret volumes through symlinks that file watchers miss). Needs a Tokio runtime; the
    /// task ends with the last clone.
    pub fn watch(files: PublicTlsFiles, interval: Duration) -> Result<Self, TlsError> {
        let source = Self::load(files)?;
        let files = source.files.clone();
        crate::tls::poll_reload(
            interval,
            &source.built,
            "public certificate",
            move |built| reload_into(&files, built),
        );
        Ok(source)
    }

    /// Re-reads the files now. `Ok(true)` when something changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        reload_into(&self.files, &self.built)
    }

    /// The freshest server configuration (no client authentication, ALPN h2).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.built.load().config.clone()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_both(files: &PublicTlsFiles) -> Result<[Vec<u8>; 2], TlsError> {
    Ok([read(&files.cert)?, read(&files.key)?])
}

fn reload_into(files: &PublicTlsFiles, built: &ArcSwap<Built>) -> Result<bool, TlsError> {
    let raw = read_both(files)?;
    if built.load().stamp == raw.concat() {
        return Ok(false);
    }
    let new = build(files, raw)?;
    tracing::info!(cert = %files.cert.display(), "loaded a new public certificate");
    built.store(Arc::new(new));
    Ok(true)
}

fn pem_err(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

fn build(files: &PublicTlsFiles, raw: [Vec<u8>; 2]) -> Result<Built, TlsError> {
    let [cert_pem, key_pem] = &raw;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(&files.cert, e))?;
    if chain.is_empty() {
        return Err(pem_err(&files.cert, "no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_err(&files.key, e))?;
    let provider = provider();
    let certified = Arc::new(CertifiedKey::from_der(chain, key, &provider)?);
    certified.keys_match().map_err(TlsError::KeyMismatch)?;
    // The same protocol choice as the mesh certificate's public configuration: internet
    // clients may still speak TLS 1.2.
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Built {
        config: Arc::new(config),
        stamp: raw.concat(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::{IpAddr, Ipv4Addr};

    use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A public CA and a server certificate for `name` from it, in `dir`.
    fn issue(dir: &Path, name: &str) -> String {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "public test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        leaf.subject_alt_names
            .push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        ca_cert.pem()
    }

    fn client(ca_pem: &str) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }

    /// Serves `tls`'s current configuration on loopback, one handshake per connection.
    async fn serve(tls: PublicTls) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                tokio::spawn(async move {
                    if let Ok(mut stream) = acceptor.accept(tcp).await {
                        let _ = stream.write_all(b"ok").await;
                        let _ = stream.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    async fn handshake(
        addr: std::net::SocketAddr,
        ca_pem: &str,
        name: &str,
    ) -> std::io::Result<()> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client(ca_pem)));
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut stream = connector.connect(server_name, tcp).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        assert_eq!(reply, b"ok");
        Ok(())
    }

    #[tokio::test]
    async fn clients_verify_the_public_name_against_its_issuer_and_a_renewal_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let first_ca = issue(dir.path(), "shop.example.com");
        let tls = PublicTls::load(PublicTlsFiles::in_dir(dir.path())).unwrap();
        let addr = serve(tls.clone()).await;
        handshake(addr, &first_ca, "shop.example.com")
            .await
            .unwrap();
        // Another name, or another issuer's roots, must not verify.
        assert!(
            handshake(addr, &first_ca, "other.example.com")
                .await
                .is_err()
        );
        let stranger = issue(&dir.path().join("stranger"), "shop.example.com");
        assert!(
            handshake(addr, &stranger, "shop.example.com")
                .await
                .is_err()
        );

        // A renewal from a new issuer: unchanged files are not a change, new ones are.
        assert!(!tls.reload().unwrap());
        let second_ca = issue(dir.path(), "shop.example.com");
        assert!(tls.reload().unwrap());
        handshake(addr, &second_ca, "shop.example.com")
            .await
            .unwrap();
        assert!(
            handshake(addr, &first_ca, "shop.example.com")
                .await
                .is_err()
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = PublicTls::load(PublicTlsFiles::in_dir(dir.path()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("tls.crt"), "{err}");
        issue(dir.path(), "shop.example.com");
        std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
        let err = PublicTls::load(PublicTlsFiles::in_dir(dir.path()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("tls.key"), "{err}");
        // A key from another pair.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("tls.key"), other.serialize_pem()).unwrap();
        let err = PublicTls::load(PublicTlsFiles::in_dir(dir.path()))
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                TlsError::KeyMismatch(_)
                    | TlsError::Rustls(rustls::Error::InconsistentKeys(
                        rustls::InconsistentKeys::KeyMismatch
                    ))
            ),
            "{err:?}"
        );
    }
}
