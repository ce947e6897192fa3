//! Server reflection, v1 and v1alpha, and grpcurl against it over mTLS.

use std::process::Command;

use tessera_mesh::server::ServerOptions;
use tonic_reflection::pb::{v1, v1alpha};

use crate::support::{POSTS, spawn_app, spawn_app_with, test_options};

const HEALTH: &str = "grpc.health.v1.Health";

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_and_describe_the_services() {
    let app = spawn_app().await;
    let channel = app.channel("gateway").await;

    // v1
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1 response: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == POSTS), "{names:?}");
    assert!(names.iter().any(|n| n == HEALTH), "{names:?}");

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(POSTS.into()),
        ),
    };
    let response = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        response.message_response
    else {
        panic!("unexpected v1 response: {response:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    // v1alpha (what grpcurl 1.8 speaks)
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let response = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1alpha response: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == POSTS), "{names:?}");
    assert!(names.iter().any(|n| n == HEALTH), "{names:?}");
}

fn grpcurl_installed() -> bool {
    match Command::new("grpcurl").arg("-version").output() {
        Ok(out) => out.status.success() || !out.stderr.is_empty(),
        Err(_) => false,
    }
}

/// Runs grpcurl with the operator's certificate files; its stdout, or a panic with stderr.
async fn grpcurl(
    files: &tessera_mesh::tls::TlsFiles,
    flags: &[&str],
    addr: std::net::SocketAddr,
    args: &[&str],
) -> String {
    let mut command = Command::new("grpcurl");
    command
        .arg("-cacert")
        .arg(&files.ca)
        .arg("-cert")
        .arg(&files.cert)
        .arg("-key")
        .arg(&files.key)
        .args(flags)
        .arg(addr.to_string())
        .args(args);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn grpcurl_lists_and_describes_over_mtls() {
    if !grpcurl_installed() {
        println!("skipped: grpcurl not installed");
        return;
    }
    let app = spawn_app_with(
        ServerOptions {
            allow_operator: true,
            ..test_options()
        },
        None,
    )
    .await;
    let files = app.client_files("operator");

    let list = grpcurl(&files, &[], app.grpc, &["list"]).await;
    let listed: Vec<&str> = list.lines().map(str::trim).collect();
    assert!(listed.contains(&POSTS), "{list}");
    assert!(listed.contains(&HEALTH), "{list}");

    let described = grpcurl(&files, &[], app.grpc, &["describe", POSTS]).await;
    assert!(described.contains("service PostService"), "{described}");
    assert!(
        described.contains("rpc GetPost ( .tessera.posts.v1.GetPostRequest ) returns ( .tessera.posts.v1.GetPostResponse )"),
        "{described}"
    );

    // allow_operator lets the operator call a method the contract does not list it for.
    let got = grpcurl(
        &files,
        &["-d", r#"{"post_id": "p1"}"#],
        app.grpc,
        &["tessera.posts.v1.PostService/GetPost"],
    )
    .await;
    assert!(got.contains(r#""postId": "p1""#), "{got}");
}
