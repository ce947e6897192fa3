//! Development certificates: a CA and workload certificates whose URI SAN is the SPIFFE id,
//! written in the layout cert-manager uses (`tls.crt`, `tls.key`, `ca.crt`) so the same
//! loader serves development and Kubernetes.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::{identity::SpiffeId, private, tls::TlsFiles};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_owned(),
        source,
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // ring's SystemRandom only fails if the OS has no randomness, where nothing else works.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// A certificate authority that can issue workload certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA written by [`Ca::save`].
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self { cert_pem, issuer })
    }

    /// Writes `ca.crt` and `ca.key` (0600 from its creation) into `dir` (0700).
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        private::secure_dir(dir).map_err(io_err(dir))?;
        write_file(&dir.join("ca.crt"), &self.cert_pem, false)?;
        write_file(
            &dir.join("ca.key"),
            &self.issuer.key().serialize_pem(),
            true,
        )
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `id`, with extra DNS names and IP addresses (development
    /// server certificates carry `localhost` and `127.0.0.1` so ordinary clients verify them).
    pub fn issue(
        &self,
        id: &SpiffeId,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.service());
        params.distinguished_name = dn;
        params
            .subject_alt_names
            .push(SanType::URI(id.to_string().try_into()?));
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into()?));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// A certificate, its key and the CA that issued it, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl Issued {
    /// Writes `tls.crt`, `tls.key` (0600 from its creation) and `ca.crt` into `dir` (0700),
    /// each replaced atomically (write to a temporary name, then rename) so a reloading
    /// reader never sees half a file.
    pub fn save(&self, dir: &Path) -> Result<TlsFiles, CertError> {
        private::secure_dir(dir).map_err(io_err(dir))?;
        let files = TlsFiles::in_dir(dir);
        write_file(&files.ca, &self.ca_pem, false)?;
        write_file(&files.key, &self.key_pem, true)?;
        write_file(&files.cert, &self.cert_pem, false)?;
        Ok(files)
    }
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    private::write_file(path, contents.as_bytes(), secret).map_err(io_err(path))
}
