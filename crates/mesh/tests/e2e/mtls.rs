//! Who gets in on the internal port: a certificate from the trust bundle is required, and the
//! contract's access rule decides which workloads may call which method.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::ClientConfig;
use tessera::posts::v1::{CreatePostRequest, GetPostRequest};
use tessera_mesh::{certs::Ca, certs::Issued, tls::TlsSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::support::{
    GET_POST, Handshakes, anonymous_client_config, connect, spawn_app, spiffe, tls_connect,
};

/// Completes the client side of a TLS 1.3 handshake and returns the server's refusal. In
/// TLS 1.3 the client finishes first, so the server's verdict on the client certificate
/// arrives as an alert on the first read.
async fn refusal(addr: SocketAddr, config: Arc<ClientConfig>) -> String {
    let mut tls = match tls_connect(addr, config, &Handshakes::default()).await {
        Ok(tls) => tls,
        Err(err) => return err.to_string(),
    };
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Err(err)) => err.to_string(),
        other => panic!("expected the server to refuse the handshake, got {other:?}"),
    }
}

/// A gRPC call over `config` must fail at the transport, never reach the service.
async fn call_fails(addr: SocketAddr, config: Arc<ClientConfig>) {
    let result = match connect(addr, config, &Handshakes::default()).await {
        Err(_) => return,
        Ok(channel) => {
            tessera::posts::v1::post_service_client::PostServiceClient::new(channel)
                .get_post(GetPostRequest {
                    post_id: "p1".into(),
                })
                .await
        }
    };
    let status = result.expect_err("a call without an acceptable certificate succeeded");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_fails_the_handshake() {
    let app = spawn_app().await;
    let config = anonymous_client_config(&app.ca);
    let refusal = refusal(app.grpc, config.clone()).await;
    assert!(refusal.contains("CertificateRequired"), "{refusal}");
    call_fails(app.grpc, config).await;
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_fails_the_handshake() {
    let app = spawn_app().await;
    // The client trusts the server's CA, but its own certificate (for an identity the rule
    // lists) comes from a CA the server does not trust.
    let other = Ca::generate("someone else's CA").unwrap();
    let foreign = other.issue(&spiffe("gateway"), &[], &[]).unwrap();
    let files = Issued {
        ca_pem: app.ca.cert_pem().to_owned(),
        ..foreign
    }
    .save(&app.dir.path().join("foreign"))
    .unwrap();
    let config = TlsSource::load(files).unwrap().client_config();
    let refusal = refusal(app.grpc, config.clone()).await;
    assert!(refusal.contains("UnknownCA"), "{refusal}");
    call_fails(app.grpc, config).await;
}

#[tokio::test]
async fn the_access_rule_decides_which_workloads_may_call() {
    let app = spawn_app().await;

    // GetPost lists gateway, comments and digest; users is not among them.
    let denied = app
        .client("users")
        .await
        .get_post(GetPostRequest {
            post_id: "p1".into(),
        })
        .await
        .expect_err("users may not call GetPost");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains(&spiffe("users").to_string()),
        "the message names the caller: {denied:?}"
    );
    assert!(
        denied.message().contains(GET_POST),
        "the message names the method: {denied:?}"
    );

    // comments may read posts but not create them.
    let mut comments = app.client("comments").await;
    let got = comments
        .get_post(GetPostRequest {
            post_id: "p1".into(),
        })
        .await
        .unwrap();
    assert_eq!(got.into_inner().post.unwrap().post_id, "p1");
    let denied = comments
        .create_post(CreatePostRequest::default())
        .await
        .expect_err("comments may not call CreatePost");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("CreatePost"), "{denied:?}");

    let got = app
        .client("gateway")
        .await
        .get_post(GetPostRequest {
            post_id: "p2".into(),
        })
        .await
        .unwrap();
    assert_eq!(got.into_inner().post.unwrap().post_id, "p2");
}

#[tokio::test]
async fn a_client_pinned_to_another_service_refuses_the_server() {
    let app = spawn_app().await;
    let gateway = TlsSource::load(app.client_files("gateway")).unwrap();
    // The app's server is `posts`; a client dialling `users` must not accept it.
    let pinned = gateway.client_config_for(&spiffe("users")).unwrap();
    let err = tls_connect(app.grpc, pinned, &Handshakes::default())
        .await
        .expect_err("a posts certificate was accepted as users");
    let message = err.to_string();
    assert!(
        message.contains(&spiffe("users").to_string())
            && message.contains(&spiffe("posts").to_string()),
        "the error names both ids: {message}"
    );
    // Pinned to the right service, the same client gets in and is served.
    let right = gateway.client_config_for(&spiffe("posts")).unwrap();
    let channel = connect(app.grpc, right, &Handshakes::default())
        .await
        .unwrap();
    let got = tessera::posts::v1::post_service_client::PostServiceClient::new(channel)
        .get_post(GetPostRequest {
            post_id: "p1".into(),
        })
        .await
        .unwrap();
    assert_eq!(got.into_inner().post.unwrap().post_id, "p1");
}
