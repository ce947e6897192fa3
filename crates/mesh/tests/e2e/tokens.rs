//! End-user tokens on a `user: true` method (CreatePost): required, verified by the server,
//! and handed to the handler as the EndUser.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use tessera::posts::v1::CreatePostRequest;
use tessera_mesh::{
    auth::TokenKeys,
    token::{DEFAULT_TOKEN_TTL, Signer, Verifier},
};
use tonic::{Code, Request};

use crate::support::{spawn_app_with, test_options};

fn with_token(token: &str) -> Request<CreatePostRequest> {
    let mut request = Request::new(CreatePostRequest {
        title: "hello".into(),
        ..CreatePostRequest::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn create_post_requires_a_valid_end_user_token() {
    let signer = Signer::generate().unwrap();
    let mut verifier = Verifier::new();
    verifier.add_key(signer.kid(), signer.public_key());
    let app = spawn_app_with(test_options(), Some(TokenKeys::fixed(verifier))).await;
    let mut client = app.client("gateway").await;

    let missing = client
        .create_post(CreatePostRequest::default())
        .await
        .expect_err("CreatePost without a token");
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");

    // Signed by a key the server does not know.
    let stranger = Signer::generate().unwrap();
    let (token, _) = stranger.sign("u-mallory", "ADMIN", DEFAULT_TOKEN_TTL);
    let unknown_key = client
        .create_post(with_token(&token))
        .await
        .expect_err("a token from an unknown key");
    assert_eq!(unknown_key.code(), Code::Unauthenticated, "{unknown_key:?}");

    // A genuine token whose claims were edited: the signature no longer matches.
    let (genuine, _) = signer.sign("u-alice", "USER", DEFAULT_TOKEN_TTL);
    let parts: Vec<&str> = genuine.split('.').collect();
    let claims = format!(
        r#"{{"sub":"u-mallory","role":"ADMIN","exp":{},"iat":0}}"#,
        u64::MAX / 2
    );
    let forged = format!("{}.{}.{}", parts[0], B64.encode(claims), parts[2]);
    let tampered = client
        .create_post(with_token(&forged))
        .await
        .expect_err("a forged token");
    assert_eq!(tampered.code(), Code::Unauthenticated, "{tampered:?}");

    let created = client
        .create_post(with_token(&genuine))
        .await
        .unwrap()
        .into_inner()
        .post
        .unwrap();
    assert_eq!(created.title, "by u-alice");
    assert_eq!(created.author_id, "u-alice");
}
