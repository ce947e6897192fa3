//! The public HTTP/JSON API end to end: curl (a real HTTP client, over HTTP/1.1 and HTTP/2)
//! against the in-process mesh, compared with what the gRPC clients get for the same data.
//!
//! Skips with a printed reason when curl is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use serde_json::Value;
use tessera::{
    comments::v1::CreateCommentRequest,
    posts::v1::{CreatePostRequest, GetPostRequest},
};
use tessera_tests::{TestMesh, bearer, spawn_mesh};

/// `curl` over `version` ("--http1.1" or "--http2"): (HTTP status, HTTP version, JSON body).
async fn curl(
    mesh: &TestMesh,
    version: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String, Value) {
    let url = format!("https://{}{path}", mesh.public_addr());
    let ca = mesh.certs_dir().join("ca.crt");
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", version, "-X", method, "--cacert"])
        .arg(&ca)
        .args(["-w", "\n%{http_code} %{http_version}"]);
    if let Some(token) = token {
        cmd.args(["-H", &format!("authorization: Bearer {token}")]);
    }
    if let Some(body) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    cmd.arg(&url);
    // curl's own --max-time bounds it; off the runtime so the mesh keeps serving meanwhile.
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {method} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (json, tail) = text.rsplit_once('\n').unwrap();
    let (code, http) = tail.split_once(' ').unwrap();
    let json = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    (code.parse().unwrap(), http.to_owned(), json)
}

fn have_curl() -> bool {
    let found = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("skipped: curl is not installed");
    }
    found
}

#[tokio::test]
async fn json_over_http1_and_http2_matches_the_grpc_answers() {
    if !have_curl() {
        return;
    }
    let mesh = spawn_mesh().await;
    let alice = mesh.sign_up("alice", "Alice").await;
    let post = mesh
        .posts()
        .create_post(bearer(
            &alice.token,
            CreatePostRequest {
                title: "Over gRPC".into(),
                body: "read back over JSON".into(),
                tags: vec!["a".into(), "b".into()],
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .post
        .unwrap();

    for version in ["--http1.1", "--http2"] {
        let started = Instant::now();
        let (code, http, json) = curl(
            &mesh,
            version,
            "GET",
            &format!("/v1/posts/{}", post.post_id),
            None,
            None,
        )
        .await;
        println!("GET over {http}: {:?}", started.elapsed());
        assert_eq!(code, 200, "{json}");
        assert_eq!(http, if version == "--http2" { "2" } else { "1.1" });
        let p = &json["post"];
        assert_eq!(p["postId"], post.post_id.as_str());
        assert_eq!(p["authorId"], alice.user_id.as_str());
        assert_eq!(p["title"], "Over gRPC");
        assert_eq!(p["tags"], serde_json::json!(["a", "b"]));
        assert_eq!(p["etag"], post.etag.as_str());
        // RFC 3339 of the same instant the gRPC answer carries.
        let created = post.create_time.unwrap();
        let rfc3339 = p["createTime"].as_str().unwrap();
        assert!(rfc3339.ends_with('Z'), "{rfc3339}");
        let ts: prost_types::Timestamp = rfc3339.parse().unwrap();
        assert_eq!((ts.seconds, ts.nanos), (created.seconds, created.nanos));
    }

    // A comment over JSON, with the token, is what gRPC then lists.
    let (code, _, made) = curl(
        &mesh,
        "--http1.1",
        "POST",
        &format!("/v1/posts/{}/comments", post.post_id),
        Some(&alice.token),
        Some(r#"{"body": "over JSON"}"#),
    )
    .await;
    assert_eq!(code, 200, "{made}");
    let listed = mesh
        .comments()
        .list_comments(tessera::comments::v1::ListCommentsRequest {
            post_id: post.post_id.clone(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .comments;
    assert_eq!(listed.len(), 1);
    assert_eq!(made["comment"]["commentId"], listed[0].comment_id.as_str());
    assert_eq!(listed[0].author_id, alice.user_id);

    // The same refusals as gRPC, with the standard HTTP statuses.
    let grpc = mesh
        .comments()
        .create_comment(CreateCommentRequest {
            post_id: post.post_id.clone(),
            body: "no token".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    let (code, _, json) = curl(
        &mesh,
        "--http2",
        "POST",
        &format!("/v1/posts/{}/comments", post.post_id),
        None,
        Some(r#"{"body": "no token"}"#),
    )
    .await;
    assert_eq!(code, 401);
    assert_eq!(json["code"], grpc.code() as i32);
    assert_eq!(json["message"], grpc.message());

    let grpc = mesh
        .posts()
        .get_post(GetPostRequest {
            post_id: "missing".into(),
        })
        .await
        .unwrap_err();
    let (code, _, json) = curl(&mesh, "--http2", "GET", "/v1/posts/missing", None, None).await;
    assert_eq!(code, 404);
    assert_eq!(json["code"], grpc.code() as i32);
    assert_eq!(json["message"], grpc.message());

    let (code, _, json) = curl(
        &mesh,
        "--http1.1",
        "POST",
        "/v1/posts",
        Some(&alice.token),
        Some(r#"{"title": ""}"#),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        json["details"][0]["fieldViolations"][0]["field"], "title",
        "{json}"
    );
    mesh.shutdown().await;
}
