//! Workload identity: SPIFFE ids, and the verified caller of a request.

use std::{fmt, str::FromStr, sync::Arc};

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "tessera.local";

/// The namespace used when none is configured: the one the manifests in k8s/ deploy into, so
/// `tessera certs`, `tessera serve` and `tessera up` agree without flags (in Kubernetes the
/// pod's own namespace is always given, from the downward API).
pub const DEFAULT_NAMESPACE: &str = "tessera";

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`: who a workload is. Cloning is
/// cheap (shared strings): every request carries its caller's id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: Arc<str>,
    namespace: Arc<str>,
    service: Arc<str>,
}

/// A string that is not a Tessera SPIFFE id; the message quotes it and says what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid SPIFFE id {input:?}: {reason}")]
pub struct ParseSpiffeIdError {
    input: String,
    reason: &'static str,
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

impl SpiffeId {
    /// Builds an id from its parts, checking each is a valid DNS-like label.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service: &str,
    ) -> Result<Self, ParseSpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service}").parse()
    }

    /// The trust domain: which CA's workloads this id belongs to (e.g. `tessera.local`).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The namespace the workload runs in (a Kubernetes namespace in a cluster).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service-account name: the name access rules list as callers.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// [`SpiffeId::service`] as a shared string, for labels that outlive the request.
    pub fn service_shared(&self) -> &Arc<str> {
        &self.service
    }

    /// The id of another workload in the same trust domain and namespace.
    pub fn sibling(&self, service: &str) -> Result<Self, ParseSpiffeIdError> {
        Self::new(&self.trust_domain, &self.namespace, service)
    }
}

impl FromStr for SpiffeId {
    type Err = ParseSpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSpiffeIdError {
            input: input.to_owned(),
            reason,
        };
        let rest = input
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                for part in [td, ns, sa] {
                    if !valid_segment(part) {
                        return Err(err(
                            "segments must be non-empty lowercase letters, digits, '-', '.' or '_'",
                        ));
                    }
                }
                Ok(Self {
                    trust_domain: (*td).into(),
                    namespace: (*ns).into(),
                    service: (*sa).into(),
                })
            }
            _ => Err(err(
                "expected spiffe://<trust-domain>/ns/<namespace>/sa/<service>",
            )),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service
        )
    }
}

/// Reads the SPIFFE id from a DER certificate's URI SAN. Exactly one `spiffe://` URI must be
/// present, as the SPIFFE X.509-SVID specification requires.
pub fn spiffe_id_from_der(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::BadCertificate)?;
    let mut found = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                if found.is_some() {
                    return Err(IdentityError::SeveralSpiffeIds);
                }
                found = Some(uri.parse::<SpiffeId>()?);
            }
        }
    }
    found.ok_or(IdentityError::NoSpiffeId)
}

/// Why no workload identity could be read from a certificate; the peer is then refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The bytes are not a DER X.509 certificate.
    #[error("the certificate could not be parsed")]
    BadCertificate,
    /// The certificate names no workload: it has no `spiffe://` URI SAN.
    #[error("the certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// The certificate is ambiguous: an X.509-SVID carries exactly one SPIFFE id.
    #[error("the certificate has more than one spiffe:// URI SAN")]
    SeveralSpiffeIds,
    /// The `spiffe://` URI is not of the form Tessera issues.
    #[error(transparent)]
    Parse(#[from] ParseSpiffeIdError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://tessera.local/ns/default/sa/posts"
            .parse()
            .unwrap();
        assert_eq!(id.service(), "posts");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.to_string(), "spiffe://tessera.local/ns/default/sa/posts");
        assert_eq!(
            id.sibling("users").unwrap().to_string(),
            "spiffe://tessera.local/ns/default/sa/users"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "http://tessera.local/ns/a/sa/b",
            "spiffe://tessera.local/ns/a/sa/",
            "spiffe://tessera.local/ns/a/b",
            "spiffe://Tessera/ns/a/sa/b",
            "spiffe://t/ns/a/sa/b/c",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
    }
}
