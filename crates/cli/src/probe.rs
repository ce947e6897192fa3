//! `tessera probe`: a gRPC health check over plaintext h2c, for Docker's HEALTHCHECK and for
//! people. Exit 0 when SERVING, 1 otherwise.

use std::time::Duration;

use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Asks `addr` (host:port, plaintext) for the status of `service`.
pub async fn probe(addr: &str, service: &str, timeout: Duration) -> Result<String, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| {
            format!(
                "{}: {}",
                tessera_mesh::metrics::code_name(s.code()),
                s.message()
            )
        })?;
    let status = resp.into_inner().status();
    Ok(status.as_str_name().to_owned())
}
