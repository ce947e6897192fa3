//! `tessera certs`: a development CA and per-workload certificates, optionally printed as
//! Kubernetes Secret manifests.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::Context;
use tessera_mesh::{
    certs::{Ca, Issued},
    identity::SpiffeId,
    tls::TlsFiles,
};

/// Certificates closer than this to expiry are reissued rather than reused.
const RENEW_MARGIN: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Where the certificates of a data dir live.
pub fn certs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("certs")
}

/// Loads the CA in `dir`, or creates one if there is none yet.
pub fn load_or_create_ca(dir: &Path) -> anyhow::Result<(Ca, bool)> {
    if dir.join("ca.crt").exists() && dir.join("ca.key").exists() {
        let ca = Ca::load(dir).with_context(|| format!("reading the CA in {}", dir.display()))?;
        // A CA about to run out is replaced (and with it every certificate it issued).
        if !tessera_mesh::certs::expires_within(ca.cert_pem(), RENEW_MARGIN) {
            return Ok((ca, false));
        }
    }
    let ca = Ca::generate("Tessera development CA")?;
    ca.save(dir)
        .with_context(|| format!("writing the CA to {}", dir.display()))?;
    Ok((ca, true))
}

/// Issues a development certificate for `name` into `dir/<name>/` unless a valid one for
/// the same identity is already there. Dev certificates also name localhost and 127.0.0.1.
pub fn ensure_workload_cert(
    ca: &Ca,
    dir: &Path,
    id: &SpiffeId,
    fresh_ca: bool,
) -> anyhow::Result<TlsFiles> {
    let out = dir.join(id.service());
    let files = TlsFiles::in_dir(&out);
    if !fresh_ca
        && files.cert.exists()
        && files.key.exists()
        && files.ca.exists()
        && let Ok(source) = tessera_mesh::tls::TlsSource::load(files.clone())
        && source.identity() == *id
        && std::fs::read_to_string(&files.cert)
            .is_ok_and(|pem| !tessera_mesh::certs::expires_within(&pem, RENEW_MARGIN))
    {
        return Ok(files);
    }
    let issued = issue_dev(ca, id)?;
    issued
        .save(&out)
        .with_context(|| format!("writing {}", out.display()))
}

/// A certificate for workload `id` signed by the dev CA, valid for `localhost`, the service's
/// name and 127.0.0.1, so local clients can reach it by any of them.
pub fn issue_dev(ca: &Ca, id: &SpiffeId) -> anyhow::Result<Issued> {
    Ok(ca.issue(
        id,
        &["localhost", id.service()],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )?)
}

/// The Secret `tessera-ca` (`kubernetes.io/tls`: the CA's certificate and key) that the
/// manifests' CA Issuer signs workload certificates with.
pub fn ca_secret_manifest(ca_dir: &Path, namespace: &str) -> anyhow::Result<String> {
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: tessera-ca\n  namespace: {namespace}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}\n  tls.key: |\n{}\n",
        indent(&read("ca.crt")?),
        indent(&read("ca.key")?),
    ))
}

/// A Kubernetes `kubernetes.io/tls` Secret named `<service>-tls` holding the files.
pub fn secret_manifest(issued: &Issued, service: &str, namespace: &str) -> String {
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {service}-tls\n  namespace: {namespace}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}\n  tls.key: |\n{}\n  ca.crt: |\n{}\n",
        indent(&issued.cert_pem),
        indent(&issued.key_pem),
        indent(&issued.ca_pem),
    )
}
