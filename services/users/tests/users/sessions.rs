//! Refresh tokens (rotation, reuse detection, logout, revocation on role change and
//! deletion), privileged decisions on the acting user's current row, and the one-time
//! bootstrap admin; on SQLite and, when `TESSERA_TEST_DATABASE_URL` is set, on PostgreSQL.

use std::time::Duration;

use tessera::users::v1::{
    DeleteUserRequest, LogoutRequest, RefreshTokenRequest, RefreshTokenResponse, Role,
    SetUserRoleRequest, User, user_service_server::UserService,
};
use tessera_mesh::errors::violated_fields;
use tessera_testing::as_user;
use tessera_users::{Users, UsersConfig};
use tonic::{Code, Request, Status};

use crate::support::{PASSWORD, cheap_hashing, create, login, services};

fn config() -> UsersConfig {
    UsersConfig {
        bootstrap_admin: Some("root".into()),
        password_params: cheap_hashing(),
        token_ttl: Duration::from_secs(300),
        key_encryption_key: Some(tessera_users::Kek::generate().unwrap()),
        ..UsersConfig::default()
    }
}

async fn refresh(svc: &Users, token: &str) -> Result<RefreshTokenResponse, Status> {
    svc.refresh_token(Request::new(RefreshTokenRequest {
        refresh_token: token.into(),
    }))
    .await
    .map(tonic::Response::into_inner)
}

async fn logout(svc: &Users, token: &str) -> Result<(), Status> {
    svc.logout(Request::new(LogoutRequest {
        refresh_token: token.into(),
    }))
    .await
    .map(|_| ())
}

async fn set_role(svc: &Users, actor: &User, token_role: &str, target: &User, role: Role) -> Code {
    svc.set_user_role(as_user(
        &actor.user_id,
        token_role,
        SetUserRoleRequest {
            user_id: target.user_id.clone(),
            role: role as i32,
        },
    ))
    .await
    .map_or_else(|s| s.code(), |_| Code::Ok)
}

async fn delete(svc: &Users, actor: &User, token_role: &str, target: &User) -> Code {
    svc.delete_user(as_user(
        &actor.user_id,
        token_role,
        DeleteUserRequest {
            user_id: target.user_id.clone(),
        },
    ))
    .await
    .map_or_else(|s| s.code(), |_| Code::Ok)
}

#[tokio::test]
async fn login_returns_short_lived_access_and_a_refresh_token() {
    let (svcs, _dbs) = services("rt_login", config()).await;
    for svc in svcs {
        let alice = create(&svc, "alice").await;
        let resp = login(&svc, "alice", PASSWORD).await.unwrap();
        assert_eq!(resp.expires_in, 300, "the configured access-token TTL");
        let claims = svc.verifier().verify(&resp.access_token).unwrap();
        assert_eq!(claims.exp - claims.iat, 300);
        assert_eq!(resp.expire_time.unwrap().seconds as u64, claims.exp);
        assert!(resp.refresh_token.len() >= 43, "256 random bits");
        assert_ne!(
            resp.refresh_token,
            login(&svc, "alice", PASSWORD).await.unwrap().refresh_token
        );

        let next = refresh(&svc, &resp.refresh_token).await.unwrap();
        assert_ne!(next.refresh_token, resp.refresh_token, "rotated");
        assert_eq!(next.expires_in, 300);
        let claims = svc.verifier().verify(&next.access_token).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.role.as_str()),
            (alice.user_id.as_str(), "USER")
        );
        assert_eq!(next.expire_time.unwrap().seconds as u64, claims.exp);
        // The new one works once, in turn.
        refresh(&svc, &next.refresh_token).await.unwrap();
    }
}

#[tokio::test]
async fn refresh_tokens_are_stored_hashed() {
    let (svcs, dbs) = services("rt_hashed", config()).await;
    for (svc, t) in svcs.iter().zip(&dbs) {
        create(svc, "alice").await;
        let token = login(svc, "alice", PASSWORD).await.unwrap().refresh_token;
        let stored: Vec<String> = sqlx::query_scalar("SELECT token_hash FROM refresh_tokens")
            .fetch_all(t.db.pool())
            .await
            .unwrap();
        assert_eq!(stored.len(), 1, "{}", t.name);
        assert_ne!(stored[0], token);
        assert_eq!(stored[0].len(), 64, "hex SHA-256");
        assert!(!stored[0].contains(&token));
    }
}

#[tokio::test]
async fn a_reused_refresh_token_revokes_the_whole_session() {
    let (svcs, _dbs) = services("rt_reuse", config()).await;
    for svc in svcs {
        create(&svc, "alice").await;
        let first = login(&svc, "alice", PASSWORD).await.unwrap().refresh_token;
        let other_session = login(&svc, "alice", PASSWORD).await.unwrap().refresh_token;
        let second = refresh(&svc, &first).await.unwrap().refresh_token;

        // The thief (or the victim) presents the rotated token again.
        let reused = refresh(&svc, &first).await.unwrap_err();
        assert_eq!(reused.code(), Code::Unauthenticated);
        assert!(reused.message().contains("already used"), "{reused:?}");
        // Every token of that session is dead, including the one not yet used.
        let revoked = refresh(&svc, &second).await.unwrap_err();
        assert_eq!(revoked.code(), Code::Unauthenticated);
        // Another session of the same user is untouched.
        refresh(&svc, &other_session).await.unwrap();
    }
}

#[tokio::test]
async fn concurrent_uses_of_one_token_yield_one_successor() {
    let (svcs, _dbs) = services("rt_race", config()).await;
    for svc in svcs {
        create(&svc, "alice").await;
        let token = login(&svc, "alice", PASSWORD).await.unwrap().refresh_token;
        let (a, b) = tokio::join!(refresh(&svc, &token), refresh(&svc, &token));
        let ok = [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count();
        assert_eq!(ok, 1, "exactly one use wins: {a:?} {b:?}");
        let loser = a.as_ref().err().or(b.as_ref().err()).unwrap();
        assert_eq!(loser.code(), Code::Unauthenticated);
        // The loser looked like reuse, so the winner's successor is revoked too.
        let winner = a.or(b).unwrap().refresh_token;
        assert_eq!(
            refresh(&svc, &winner).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
}

#[tokio::test]
async fn logout_revokes_the_session() {
    let (svcs, _dbs) = services("rt_logout", config()).await;
    for svc in svcs {
        create(&svc, "alice").await;
        let token = login(&svc, "alice", PASSWORD).await.unwrap().refresh_token;
        let rotated = refresh(&svc, &token).await.unwrap().refresh_token;
        logout(&svc, &rotated).await.unwrap();
        assert_eq!(
            refresh(&svc, &rotated).await.unwrap_err().code(),
            Code::Unauthenticated
        );
        // Idempotent: a retried Logout, or one with an unknown token, succeeds.
        logout(&svc, &rotated).await.unwrap();
        logout(&svc, "never-issued").await.unwrap();
    }
}

#[tokio::test]
async fn bad_unknown_and_expired_refresh_tokens() {
    let expiring = UsersConfig {
        refresh_token_ttl: Duration::ZERO,
        ..config()
    };
    let (svcs, dbs) = services("rt_bad", expiring).await;
    for (svc, t) in svcs.into_iter().zip(&dbs) {
        for (bad, why) in [("", "is required"), (&*"x".repeat(129), "too long")] {
            let err = refresh(&svc, bad).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{why}");
            assert_eq!(violated_fields(&err), vec!["refresh_token"], "{why}");
            let err = logout(&svc, bad).await.unwrap_err();
            assert_eq!(violated_fields(&err), vec!["refresh_token"], "{why}");
        }
        let unknown = refresh(&svc, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::Unauthenticated);
        assert!(unknown.message().contains("unknown"), "{unknown:?}");

        create(&svc, "alice").await;
        let token = login(&svc, "alice", PASSWORD).await.unwrap().refresh_token;
        let expired = refresh(&svc, &token).await.unwrap_err();
        assert_eq!(expired.code(), Code::Unauthenticated);
        assert!(expired.message().contains("expired"), "{expired:?}");

        // Expired tokens do not pile up: each login prunes them.
        for _ in 0..3 {
            login(&svc, "alice", PASSWORD).await.unwrap();
        }
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM refresh_tokens")
            .fetch_one(t.db.pool())
            .await
            .unwrap();
        assert_eq!(stored, 1, "{}", t.name);
    }
}

#[tokio::test]
async fn role_change_and_deletion_revoke_refresh_tokens() {
    let (svcs, _dbs) = services("rt_revoke", config()).await;
    for svc in svcs {
        let root = create(&svc, "root").await;
        let alice = create(&svc, "alice").await;
        let bob = create(&svc, "bob").await;
        let alice_token = login(&svc, "alice", PASSWORD).await.unwrap().refresh_token;
        let bob_token = login(&svc, "bob", PASSWORD).await.unwrap().refresh_token;

        assert_eq!(
            set_role(&svc, &root, "ADMIN", &alice, Role::Moderator).await,
            Code::Ok
        );
        assert_eq!(
            refresh(&svc, &alice_token).await.unwrap_err().code(),
            Code::Unauthenticated,
            "the old role must not live on in a refreshed token"
        );
        // After logging in again, tokens carry the new role.
        let relogin = login(&svc, "alice", PASSWORD).await.unwrap();
        let refreshed = refresh(&svc, &relogin.refresh_token).await.unwrap();
        assert_eq!(
            svc.verifier().verify(&refreshed.access_token).unwrap().role,
            "MODERATOR"
        );

        assert_eq!(delete(&svc, &root, "ADMIN", &bob).await, Code::Ok);
        assert_eq!(
            refresh(&svc, &bob_token).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
}

#[tokio::test]
async fn demoted_or_deleted_admins_are_refused_at_once() {
    let (svcs, _dbs) = services("rt_stale_admin", config()).await;
    for svc in svcs {
        let root = create(&svc, "root").await;
        let carol = create(&svc, "carol").await;
        let dave = create(&svc, "dave").await;
        assert_eq!(
            set_role(&svc, &root, "ADMIN", &carol, Role::Admin).await,
            Code::Ok
        );

        // Carol demotes root. Root's access token still says ADMIN, but the row does not.
        assert_eq!(
            set_role(&svc, &carol, "ADMIN", &root, Role::User).await,
            Code::Ok
        );
        assert_eq!(
            set_role(&svc, &root, "ADMIN", &dave, Role::Admin).await,
            Code::PermissionDenied
        );
        assert_eq!(
            delete(&svc, &root, "ADMIN", &dave).await,
            Code::PermissionDenied
        );

        // Carol deletes herself: her still-valid ADMIN token can do nothing privileged.
        assert_eq!(delete(&svc, &carol, "ADMIN", &carol).await, Code::Ok);
        assert_eq!(
            set_role(&svc, &carol, "ADMIN", &root, Role::Admin).await,
            Code::PermissionDenied
        );
        assert_eq!(
            delete(&svc, &carol, "ADMIN", &dave).await,
            Code::PermissionDenied
        );
        // Dave is untouched and may still delete himself.
        assert_eq!(delete(&svc, &dave, "USER", &dave).await, Code::Ok);
    }
}

#[tokio::test]
async fn the_bootstrap_admin_is_granted_once() {
    let (svcs, _dbs) = services("bootstrap_once", config()).await;
    for svc in svcs {
        // A user signing up before the admin is just a user.
        let early = create(&svc, "early").await;
        assert_eq!(early.role, Role::User as i32);
        let root = create(&svc, "root").await;
        assert_eq!(root.role, Role::Admin as i32);

        // Another admin deletes root; the name is free, but the grant is spent.
        let alice = create(&svc, "alice").await;
        assert_eq!(
            set_role(&svc, &root, "ADMIN", &alice, Role::Admin).await,
            Code::Ok
        );
        assert_eq!(delete(&svc, &alice, "ADMIN", &root).await, Code::Ok);
        let again = create(&svc, "root").await;
        assert_eq!(
            again.role,
            Role::User as i32,
            "an anonymous re-sign-up as root"
        );

        // Even with no admin left at all, the grant is not made a second time.
        assert_eq!(delete(&svc, &alice, "ADMIN", &alice).await, Code::Ok);
        assert_eq!(delete(&svc, &again, "USER", &again).await, Code::Ok);
        let third = create(&svc, "root").await;
        assert_eq!(third.role, Role::User as i32);
    }
}

#[tokio::test]
async fn the_bootstrap_name_is_not_admin_while_another_admin_exists() {
    let (svcs, dbs) = services("bootstrap_existing", config()).await;
    for (svc, t) in svcs.iter().zip(&dbs) {
        // An admin made some other way (e.g. a database restored from before the grant
        // was recorded): the bootstrap name gets no second admin.
        let zed = create(svc, "zed").await;
        sqlx::query("UPDATE users SET role = 'ADMIN' WHERE user_id = $1")
            .bind(&zed.user_id)
            .execute(t.db.pool())
            .await
            .unwrap();
        assert_eq!(
            create(svc, "root").await.role,
            Role::User as i32,
            "{}",
            t.name
        );
    }
}
