//! Development certificates: a CA and workload certificates whose URI SAN is the SPIFFE id,
//! written in the layout cert-manager uses (`tls.crt`, `tls.key`, `ca.crt`) so the same
//! loader serves development and Kubernetes.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::pki_types::pem::PemObject;
use x509_parser::time::ASN1Time;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::{identity::SpiffeId, private, tls::TlsFiles};

/// Why a development CA or certificate could not be made, loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or the key (also a CA key or certificate that does not parse).
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The system clock is before 1970 or beyond what an X.509 validity can hold.
    #[error("the system clock is outside what a certificate can say")]
    Clock,
    /// A file or directory of the certificate layout could not be read, created or written.
    #[error("cannot write {path}")]
    Io {
        /// The file or directory that failed.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How long a development CA is valid: a year; `tessera up` replaces it when it runs out.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a development workload certificate is valid: days, not centuries, so a copied
/// key stops working soon; `tessera up` reissues it before it runs out.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Back-dating of `not_before`, for clocks a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// Makes `params` valid from now (less the clock skew) for `validity`.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), CertError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CertError::Clock)?
        .as_secs() as i64;
    // x509-parser's ASN1Time is the way to the `time` types rcgen takes.
    let at = |secs: i64| {
        ASN1Time::from_timestamp(secs)
            .map(|t| t.to_datetime())
            .map_err(|_| CertError::Clock)
    };
    params.not_before = at(now - CLOCK_SKEW.as_secs() as i64)?;
    params.not_after = at(now + validity.as_secs() as i64)?;
    Ok(())
}

/// Whether the first certificate in `pem` has expired or will within `margin` (or cannot be
/// read, which needs replacing just as much).
pub fn expires_within(pem: &str, margin: Duration) -> bool {
    let Some(der) = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
    else {
        return true;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return true;
    };
    let deadline = ASN1Time::now().timestamp() + margin.as_secs() as i64;
    cert.validity().not_after.timestamp() <= deadline
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
        set_validity(&mut params, CA_VALIDITY)?;
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

    /// The CA certificate in PEM: what a peer trusts (`ca.crt`) to accept certificates it issues.
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
        set_validity(&mut params, LEAF_VALIDITY)?;
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
    /// The workload certificate, its SPIFFE id in the URI SAN (`tls.crt`).
    pub cert_pem: String,
    /// The certificate's private key, PKCS#8 (`tls.key`); a secret.
    pub key_pem: String,
    /// The issuing CA's certificate (`ca.crt`), to verify peers with.
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn development_certificates_expire_in_days_and_are_seen_to() {
        let ca = Ca::generate("test CA").unwrap();
        let id = SpiffeId::new("tessera.local", "tessera", "posts").unwrap();
        let leaf = ca.issue(&id, &["localhost"], &[]).unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes()).unwrap();
        let cert = parsed.parse_x509().unwrap();
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        let expected = (LEAF_VALIDITY + CLOCK_SKEW).as_secs() as i64;
        assert!((lifetime - expected).abs() <= 5, "{lifetime} s");
        assert!(cert.validity().is_valid());
        // Fresh: not within a week of expiry; within 31 days it is.
        assert!(!expires_within(
            &leaf.cert_pem,
            Duration::from_secs(7 * 24 * 3600)
        ));
        assert!(expires_within(
            &leaf.cert_pem,
            Duration::from_secs(31 * 24 * 3600)
        ));
        assert!(!expires_within(ca.cert_pem(), LEAF_VALIDITY));
        assert!(expires_within("not a certificate", Duration::ZERO));
    }
}
