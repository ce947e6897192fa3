//! Sessions and keys end to end, through the gateway's public port: Login's refresh token,
//! RefreshToken's rotation and reuse detection, Logout, and a signing key rotated by `tessera
//! keys rotate` (the real binary, on the running mesh's data dir) that the gateway and posts
//! pick up without a restart.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use tessera::{
    posts::v1::CreatePostRequest,
    users::v1::{LoginResponse, LogoutRequest, RefreshTokenRequest},
};
use tessera_mesh::{errors::violated_fields, token::Verifier};
use tessera_tests::{BOUND, PASSWORD, TestMesh, bearer, eventually, spawn_mesh};
use tonic::Code;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera-under-test");

fn post(title: &str) -> CreatePostRequest {
    CreatePostRequest {
        title: title.into(),
        body: "body".into(),
        tags: vec![],
        request_id: String::new(),
    }
}

async fn log_in(mesh: &TestMesh, username: &str) -> LoginResponse {
    mesh.log_in(username, PASSWORD).await.unwrap()
}

#[tokio::test]
async fn refresh_rotates_reuse_revokes_and_logout_ends_the_session() {
    let mesh = spawn_mesh().await;
    mesh.sign_up("alice", "Alice").await;
    let login = log_in(&mesh, "alice").await;
    assert_eq!(login.expires_in, 900, "the default access-token lifetime");
    assert!(!login.refresh_token.is_empty());
    let mut users = mesh.users();

    let refreshed = users
        .refresh_token(RefreshTokenRequest {
            refresh_token: login.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(refreshed.refresh_token, login.refresh_token);
    // The refreshed access token is as good as the first one.
    mesh.posts()
        .create_post(bearer(&refreshed.access_token, post("refreshed")))
        .await
        .unwrap();

    // Presenting the used token again revokes the session: its successor is dead too.
    let reused = users
        .refresh_token(RefreshTokenRequest {
            refresh_token: login.refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::Unauthenticated, "{reused:?}");
    let successor = users
        .refresh_token(RefreshTokenRequest {
            refresh_token: refreshed.refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(successor.code(), Code::Unauthenticated);

    // Logout ends another session.
    let second = log_in(&mesh, "alice").await;
    users
        .logout(LogoutRequest {
            refresh_token: second.refresh_token.clone(),
        })
        .await
        .unwrap();
    let after = users
        .refresh_token(RefreshTokenRequest {
            refresh_token: second.refresh_token,
        })
        .await
        .unwrap_err();
    assert_eq!(after.code(), Code::Unauthenticated);

    // Bad input is INVALID_ARGUMENT naming the field, through the gateway as well.
    let empty = users
        .refresh_token(RefreshTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&empty), vec!["refresh_token"]);
    let empty = users.logout(LogoutRequest::default()).await.unwrap_err();
    assert_eq!(violated_fields(&empty), vec!["refresh_token"]);
    mesh.shutdown().await;
}

#[tokio::test]
async fn a_key_rotated_on_demand_is_used_and_verified_without_a_restart() {
    let mesh = spawn_mesh().await;
    mesh.sign_up("bob", "Bob").await;
    let before = log_in(&mesh, "bob").await.access_token;
    let old_kid = Verifier::peek_kid(&before).unwrap();
    // The gateway and posts have seen (and fetched) the old key.
    mesh.posts()
        .create_post(bearer(&before, post("before")))
        .await
        .unwrap();

    let out = Command::new(TESSERA)
        .args(["keys", "rotate", "--data-dir"])
        .arg(mesh.data_dir())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let new_kid = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_ne!(new_kid, old_kid);

    // The running users service publishes it at its next key check and signs with it 10 s
    // later (every replica publishes a key before any signs with it)...
    let after = eventually(2 * BOUND, async || {
        let token = log_in(&mesh, "bob").await.access_token;
        let kid = Verifier::peek_kid(&token)?;
        anyhow::ensure!(kid == new_kid, "still signing with {kid}");
        Ok(token)
    })
    .await;
    // ...and the gateway and posts accept its tokens once they refetch the keys (an unknown
    // key id triggers that, at most every few seconds).
    eventually(BOUND, async || {
        mesh.posts()
            .create_post(bearer(&after, post("after")))
            .await?;
        Ok(())
    })
    .await;
    // Tokens signed with the old key stay valid until they expire.
    mesh.posts()
        .create_post(bearer(&before, post("old key")))
        .await
        .unwrap();
    mesh.shutdown().await;
}
