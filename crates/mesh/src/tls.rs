//! mTLS for the mesh: rustls configurations built from certificate files, and rebuilt when
//! the files change so rotation needs no restart.
//!
//! Live connections keep the configuration they were accepted or made with; only new
//! handshakes see the new certificate. Workload identity is the SPIFFE URI SAN: servers take
//! the caller's from its verified client certificate, and clients pin the server: its
//! certificate must chain to the trust bundle and name exactly the SPIFFE id of the service
//! being dialled ([`TlsSource::client_config_for`]), as Linkerd and Istio do. Otherwise any
//! workload of the mesh could answer for any other (a fake `users` planting token keys). DNS
//! names are not checked on internal hops: pods are addressed by IP. The pin is checked once
//! per handshake; calls on the connection pay nothing for it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
};

use crate::identity::{SpiffeId, spiffe_id_from_der};

/// Where a workload's certificate, key and trust bundle live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The workload certificate chain in PEM, leaf first; the leaf names the SPIFFE id.
    pub cert: PathBuf,
    /// The leaf's private key in PEM.
    pub key: PathBuf,
    /// The trust bundle in PEM: the CAs whose workloads are accepted as peers.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `tls.crt`, `tls.key` and `ca.crt` in `dir`: the layout of a cert-manager Secret.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }
}

/// Why certificate files could not be turned into a TLS configuration. On a reload the
/// configuration in use is kept, so a half-written Secret never takes a port down.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file is not the PEM it should be, or holds no certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with its contents.
        what: String,
    },
    /// The key is not the one the leaf certificate was issued for.
    #[error("the certificate does not match the private key: {0}")]
    KeyMismatch(rustls::Error),
    /// rustls refused the certificate, key or configuration.
    #[error("invalid TLS material: {0}")]
    Rustls(#[from] rustls::Error),
    /// The trust bundle cannot verify client certificates (e.g. it holds no CA).
    #[error("invalid trust bundle: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The leaf certificate does not name exactly one valid SPIFFE id.
    #[error("the certificate names no usable SPIFFE id: {0}")]
    Identity(#[from] crate::identity::IdentityError),
}

/// The one crypto provider of the process (ring), so rustls never guesses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The shortest certificate reload interval [`TlsSource::watch`] polls at.
pub const MIN_RELOAD_INTERVAL: Duration = Duration::from_millis(10);

/// The identity a development `operator` certificate carries: a person with grpcurl, never a
/// server, so no client accepts it on the server side of a handshake.
pub const OPERATOR: &str = "operator";

struct Built {
    mtls_server: Arc<ServerConfig>,
    public_server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// Client configurations pinned to one server identity, made on first use and kept until
    /// the material is reloaded (each also keeps its own TLS session cache).
    pinned: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
    roots: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
    identity: SpiffeId,
    /// The raw file contents the configs were built from, to notice changes.
    stamp: Vec<u8>,
}

/// A workload's TLS material, rebuilt from its files when they change.
#[derive(Clone)]
pub struct TlsSource {
    files: Arc<TlsFiles>,
    built: Arc<ArcSwap<Built>>,
    /// The gateway's public certificate, when it has its own ([`TlsSource::with_public`]).
    public: Option<crate::public_tls::PublicTls>,
}

impl TlsSource {
    /// Reads and checks the files now; fails if they are missing, malformed, do not match, or
    /// the certificate has no SPIFFE id.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let built = build(&files, read_all(&files)?)?;
        Ok(Self {
            files: Arc::new(files),
            built: Arc::new(ArcSwap::from_pointee(built)),
            public: None,
        })
    }

    /// Serves `public` on the public port instead of the mesh certificate.
    pub fn with_public(mut self, public: crate::public_tls::PublicTls) -> Self {
        self.public = Some(public);
        self
    }

    /// Like [`TlsSource::load`], then polls the files every `interval` on a background task
    /// (polling, because Kubernetes swaps Secret volumes through symlinks that file watchers
    /// miss). The task ends when the last clone of the source is dropped.
    /// An interval below [`MIN_RELOAD_INTERVAL`] (zero included) is raised to it: the
    /// configuration refuses such values, and a library caller passing one gets polling, not a
    /// panicking task and a rotation that silently stops.
    pub fn watch(files: TlsFiles, interval: Duration) -> Result<Self, TlsError> {
        let source = Self::load(files)?;
        let files = source.files.clone();
        poll_reload(interval, &source.built, "certificate", move |built| {
            reload_into(&files, built)
        });
        Ok(source)
    }

    /// Re-reads the files now. `Ok(true)` when something changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        reload_into(&self.files, &self.built)
    }

    /// Server configuration that requires a client certificate from the trust bundle.
    pub fn mtls_server_config(&self) -> Arc<ServerConfig> {
        self.built.load().mtls_server.clone()
    }

    /// Server configuration without client authentication (the gateway's public port): the
    /// public certificate if one was given, else the mesh certificate (development).
    pub fn public_server_config(&self) -> Arc<ServerConfig> {
        match &self.public {
            Some(public) => public.server_config(),
            None => self.built.load().public_server.clone(),
        }
    }

    /// Client configuration that presents this workload's certificate and accepts any server
    /// of the trust domain (except the `operator` identity). For tools and tests that dial
    /// more than one workload; mesh clients use [`TlsSource::client_config_for`].
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.built.load().client.clone()
    }

    /// Client configuration that presents this workload's certificate and accepts only a
    /// server whose certificate names exactly `expected`. Another identity fails the
    /// handshake, logged with both ids. Cheap after the first call for an id (cached until the
    /// files change).
    pub fn client_config_for(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsError> {
        let built = self.built.load();
        let mut pinned = built
            .pinned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(config) = pinned.get(expected) {
            return Ok(config.clone());
        }
        let config = client_config(
            built.roots.clone(),
            built.certified.clone(),
            ServerIdentity::Exactly(expected.clone()),
        )?;
        pinned.insert(expected.clone(), config.clone());
        Ok(config)
    }

    /// The SPIFFE id in this workload's certificate.
    pub fn identity(&self) -> SpiffeId {
        self.built.load().identity.clone()
    }

    /// The files this source reads (and re-reads).
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// The client side of a workload's TLS material; see [`TlsSource`].
#[derive(Clone)]
pub struct ClientTls(TlsSource);

impl ClientTls {
    /// Loads the files and reloads them every `reload_interval` (needs a Tokio runtime).
    pub fn load(files: TlsFiles, reload_interval: Duration) -> Result<Self, TlsError> {
        TlsSource::watch(files, reload_interval).map(Self)
    }

    /// The freshest client configuration (TLS 1.3, ALPN h2, client certificate presented),
    /// accepting any server of the trust domain; see [`TlsSource::client_config`].
    pub fn config(&self) -> Arc<ClientConfig> {
        self.0.client_config()
    }

    /// The freshest client configuration that accepts only a server named `expected`; see
    /// [`TlsSource::client_config_for`].
    pub fn config_for(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsError> {
        self.0.client_config_for(expected)
    }

    /// The SPIFFE id in this workload's certificate: who servers see calling.
    pub fn identity(&self) -> SpiffeId {
        self.0.identity()
    }
}

impl From<TlsSource> for ClientTls {
    fn from(source: TlsSource) -> Self {
        Self(source)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_all(files: &TlsFiles) -> Result<[Vec<u8>; 3], TlsError> {
    Ok([read(&files.cert)?, read(&files.key)?, read(&files.ca)?])
}

/// Re-reads certificate files every `interval` on a background task that ends when the last
/// holder of `built` is gone. A failed reload keeps the last good material (a half-written
/// rotation is picked up on a later tick). An interval below [`MIN_RELOAD_INTERVAL`] (zero
/// included) is raised to it rather than panicking the task.
pub(crate) fn poll_reload<B: Send + Sync + 'static>(
    interval: Duration,
    built: &Arc<ArcSwap<B>>,
    what: &'static str,
    reload: impl Fn(&ArcSwap<B>) -> Result<bool, TlsError> + Send + 'static,
) {
    let interval = if interval < MIN_RELOAD_INTERVAL {
        tracing::warn!(?interval, min = ?MIN_RELOAD_INTERVAL, what, "reload interval too short; using the minimum");
        MIN_RELOAD_INTERVAL
    } else {
        interval
    };
    let weak: Weak<ArcSwap<B>> = Arc::downgrade(built);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(built) = weak.upgrade() else { return };
            if let Err(err) = reload(&built) {
                tracing::warn!(error = %err, what, "reload failed; keeping the current one");
            }
        }
    });
}

fn reload_into(files: &TlsFiles, built: &ArcSwap<Built>) -> Result<bool, TlsError> {
    let raw = read_all(files)?;
    if built.load().stamp == raw.concat() {
        return Ok(false);
    }
    let new = build(files, raw)?;
    tracing::info!(identity = %new.identity, "loaded a new workload certificate");
    built.store(Arc::new(new));
    Ok(true)
}

fn pem_err(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

fn build(files: &TlsFiles, raw: [Vec<u8>; 3]) -> Result<Built, TlsError> {
    let [cert_pem, key_pem, ca_pem] = &raw;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(&files.cert, e))?;
    let Some(leaf) = chain.first() else {
        return Err(pem_err(&files.cert, "no certificate found"));
    };
    let identity = spiffe_id_from_der(leaf)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_err(&files.key, e))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| pem_err(&files.ca, e))?)
            .map_err(|e| pem_err(&files.ca, e))?;
    }
    if roots.is_empty() {
        return Err(pem_err(&files.ca, "no CA certificate found"));
    }
    let roots = Arc::new(roots);
    let provider = provider();
    let certified = Arc::new(CertifiedKey::from_der(chain, key, &provider)?);
    certified.keys_match().map_err(TlsError::KeyMismatch)?;

    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut mtls_server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            certified.clone(),
        )));
    mtls_server.alpn_protocols = vec![b"h2".to_vec()];

    let mut public_server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            certified.clone(),
        )));
    public_server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let client = client_config(
        roots.clone(),
        certified.clone(),
        ServerIdentity::InTrustDomain(identity.trust_domain().to_owned()),
    )?;

    Ok(Built {
        mtls_server: Arc::new(mtls_server),
        public_server: Arc::new(public_server),
        client,
        pinned: Mutex::new(HashMap::new()),
        roots,
        certified,
        identity,
        stamp: raw.concat(),
    })
}

/// TLS 1.3 and ALPN h2, presenting `certified`, verifying the server as `server` says.
fn client_config(
    roots: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
    server: ServerIdentity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots,
        server,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(client))
}

/// Which server identities a client accepts.
#[derive(Debug)]
enum ServerIdentity {
    /// Exactly this workload: what mesh clients dial.
    Exactly(SpiffeId),
    /// Any workload of the trust domain but `operator`.
    InTrustDomain(String),
}

/// The server named another SPIFFE id than the client pinned.
#[derive(Debug, thiserror::Error)]
#[error("the server is {presented}, expected {expected}")]
pub struct IdentityMismatch {
    /// The SPIFFE id the client pinned: the service it meant to dial.
    pub expected: String,
    /// The SPIFFE id in the certificate the server presented.
    pub presented: String,
}

/// Verifies a server by chain and SPIFFE id instead of DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    server: ServerIdentity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    fn refuse(expected: String, presented: String) -> rustls::Error {
        // The handshake error reaches the caller only as a failed connect; this line is
        // what tells an operator which workload answered in whose place.
        tracing::warn!(%expected, %presented, "refused a server presenting another identity");
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(IdentityMismatch {
                expected,
                presented,
            }),
        )))
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = spiffe_id_from_der(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        })?;
        match &self.server {
            ServerIdentity::Exactly(expected) if id != *expected => {
                return Err(Self::refuse(expected.to_string(), id.to_string()));
            }
            ServerIdentity::InTrustDomain(domain)
                if id.trust_domain() != domain || id.service() == OPERATOR =>
            {
                return Err(Self::refuse(
                    format!("spiffe://{domain}/ns/*/sa/* (not {OPERATOR})"),
                    id.to_string(),
                ));
            }
            _ => {}
        }
        Ok(ServerCertVerified::assertion())
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
