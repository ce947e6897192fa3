//! UserService handlers called directly (no sockets), on SQLite and, when
//! `TESSERA_TEST_DATABASE_URL` is set, on PostgreSQL.

use std::time::Duration;

use futures::StreamExt;
use tessera::users::v1::{
    BatchGetUsersRequest, CreateUserRequest, DeleteUserRequest, GetJwksRequest, GetUserRequest,
    Role, SetUserRoleRequest, WatchEventsRequest, user_service_server::UserService,
    watch_events_response::Event,
};
use tessera_mesh::{errors::violated_fields, token::Verifier};
use tessera_testing::as_user;
use tessera_users::{Users, UsersConfig};
use tonic::{Code, Request};

use crate::support::{PASSWORD, cheap_hashing, create, login, services, signup};

fn config() -> UsersConfig {
    UsersConfig {
        bootstrap_admin: Some("root".into()),
        password_params: cheap_hashing(),
        // Fixed, so a reopened database can unseal its signing keys.
        key_encryption_key: Some(tessera_users::Kek::from_bytes(&[7; 32]).unwrap()),
        ..UsersConfig::default()
    }
}

#[tokio::test]
async fn signup_login_and_token_keys() {
    let (svcs, _dir) = services("login", config()).await;
    for svc in svcs {
        let alice = create(&svc, "alice").await;
        assert_eq!(alice.username, "alice");
        assert_eq!(
            alice.email, "alice@example.org",
            "the creator sees the email"
        );
        assert_eq!(alice.role, Role::User as i32);
        assert!(alice.create_time.is_some());

        let resp = login(&svc, "alice", PASSWORD).await.unwrap();
        assert_eq!(resp.user.as_ref().unwrap().user_id, alice.user_id);
        let claims = svc.verifier().verify(&resp.access_token).unwrap();
        assert_eq!(claims.sub, alice.user_id);
        assert_eq!(claims.role, "USER");
        assert_eq!(resp.expire_time.unwrap().seconds as u64, claims.exp);
        assert!(claims.exp > claims.iat);

        // The published JWKS verifies the token, as other services will.
        let jwks = svc
            .get_jwks(Request::new(GetJwksRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(jwks.keys.len(), 1);
        let jwk = &jwks.keys[0];
        assert_eq!(
            (
                jwk.kty.as_str(),
                jwk.crv.as_str(),
                jwk.alg.as_str(),
                jwk.r#use.as_str()
            ),
            ("OKP", "Ed25519", "EdDSA", "sig")
        );
        assert_eq!(Verifier::peek_kid(&resp.access_token).unwrap(), jwk.kid);
        let mut v = Verifier::new();
        v.add_jwk(&jwk.kid, &jwk.x).unwrap();
        assert_eq!(v.verify(&resp.access_token).unwrap(), claims);

        // Unknown user and wrong password look the same.
        let wrong = login(&svc, "alice", "wrong password").await.unwrap_err();
        let unknown = login(&svc, "nobody", PASSWORD).await.unwrap_err();
        assert_eq!(wrong.code(), Code::Unauthenticated);
        assert_eq!(unknown.code(), Code::Unauthenticated);
        assert_eq!(wrong.message(), unknown.message());
    }
}

#[tokio::test]
async fn bad_inputs_are_rejected_with_the_right_code() {
    let (svcs, _dir) = services("bad_inputs", config()).await;
    for svc in svcs {
        let alice = create(&svc, "alice").await;
        let root = create(&svc, "root").await;

        // Each validation rule names its field.
        let cases: Vec<(&str, CreateUserRequest)> = vec![
            (
                "username",
                CreateUserRequest {
                    username: "ab".into(),
                    ..signup("x")
                },
            ),
            (
                "username",
                CreateUserRequest {
                    username: "Alice2".into(),
                    ..signup("x")
                },
            ),
            (
                "username",
                CreateUserRequest {
                    username: "a-b-c".into(),
                    ..signup("x")
                },
            ),
            (
                "username",
                CreateUserRequest {
                    username: "x".repeat(33),
                    ..signup("x")
                },
            ),
            (
                "username",
                CreateUserRequest {
                    username: "bob'; DROP TABLE users;--".into(),
                    ..signup("x")
                },
            ),
            (
                "email",
                CreateUserRequest {
                    email: "not-an-email".into(),
                    ..signup("bob")
                },
            ),
            (
                "email",
                CreateUserRequest {
                    email: "a@b".into(),
                    ..signup("bob")
                },
            ),
            (
                "email",
                CreateUserRequest {
                    email: "a b@c.org".into(),
                    ..signup("bob")
                },
            ),
            (
                "password",
                CreateUserRequest {
                    password: "short".into(),
                    ..signup("bob")
                },
            ),
            (
                "password",
                CreateUserRequest {
                    password: "x".repeat(2000),
                    ..signup("bob")
                },
            ),
            (
                "display_name",
                CreateUserRequest {
                    display_name: "  ".into(),
                    ..signup("bob")
                },
            ),
            (
                "display_name",
                CreateUserRequest {
                    display_name: "d".repeat(65),
                    ..signup("bob")
                },
            ),
            (
                "display_name",
                CreateUserRequest {
                    display_name: "a\u{0}b".into(),
                    ..signup("bob")
                },
            ),
            (
                "request_id",
                CreateUserRequest {
                    request_id: "r".repeat(129),
                    ..signup("bob")
                },
            ),
        ];
        for (field, req) in cases {
            let err = svc
                .create_user(Request::new(req.clone()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {req:?}");
            assert!(
                violated_fields(&err).contains(&field.to_owned()),
                "{field}: {err:?}"
            );
        }

        let taken = svc
            .create_user(Request::new(signup("alice")))
            .await
            .unwrap_err();
        assert_eq!(taken.code(), Code::AlreadyExists);

        let missing = svc
            .get_user(Request::new(GetUserRequest {
                user_id: "no-such-id".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
        let empty = svc
            .get_user(Request::new(GetUserRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&empty), vec!["user_id"]);

        let too_many = svc
            .batch_get_users(Request::new(BatchGetUsersRequest {
                user_ids: vec![alice.user_id.clone(); 101],
            }))
            .await
            .unwrap_err();
        assert_eq!(too_many.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&too_many), vec!["user_ids"]);

        let login_empty = login(&svc, "", "").await.unwrap_err();
        assert_eq!(login_empty.code(), Code::InvalidArgument);

        // Authorization.
        let set_role = SetUserRoleRequest {
            user_id: alice.user_id.clone(),
            role: Role::Admin as i32,
        };
        let not_admin = svc
            .set_user_role(as_user(&alice.user_id, "MODERATOR", set_role.clone()))
            .await
            .unwrap_err();
        assert_eq!(not_admin.code(), Code::PermissionDenied);
        let anonymous = svc.set_user_role(Request::new(set_role)).await.unwrap_err();
        assert_eq!(anonymous.code(), Code::Unauthenticated);
        let bad_role = svc
            .set_user_role(as_user(
                &root.user_id,
                "ADMIN",
                SetUserRoleRequest {
                    user_id: alice.user_id.clone(),
                    role: 0,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&bad_role), vec!["role"]);
        let unknown_target = svc
            .set_user_role(as_user(
                &root.user_id,
                "ADMIN",
                SetUserRoleRequest {
                    user_id: "nope".into(),
                    role: Role::User as i32,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(unknown_target.code(), Code::NotFound);

        let other = svc
            .delete_user(as_user(
                "someone-else",
                "MODERATOR",
                DeleteUserRequest {
                    user_id: alice.user_id.clone(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(other.code(), Code::PermissionDenied);
        let anonymous = svc
            .delete_user(Request::new(DeleteUserRequest {
                user_id: alice.user_id.clone(),
            }))
            .await
            .unwrap_err();
        assert_eq!(anonymous.code(), Code::Unauthenticated);
        let admin_unknown = svc
            .delete_user(as_user(
                &root.user_id,
                "ADMIN",
                DeleteUserRequest {
                    user_id: "nope".into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(admin_unknown.code(), Code::NotFound);

        let negative = svc
            .watch_events(Request::new(WatchEventsRequest {
                after_sequence: -1,
                ..Default::default()
            }))
            .await
            .err()
            .unwrap();
        assert_eq!(violated_fields(&negative), vec!["after_sequence"]);
    }
}

#[tokio::test]
async fn email_is_shown_only_to_its_owner_or_an_admin() {
    let (svcs, _dir) = services("email", config()).await;
    for svc in svcs {
        let root = create(&svc, "root").await;
        let alice = create(&svc, "alice").await;
        let bob = create(&svc, "bob").await;
        let get = |req: Request<GetUserRequest>| {
            let svc = svc.clone();
            async move { svc.get_user(req).await.unwrap().into_inner().user.unwrap() }
        };
        let id = || GetUserRequest {
            user_id: alice.user_id.clone(),
        };
        assert_eq!(get(Request::new(id())).await.email, "");
        assert_eq!(
            get(as_user(&bob.user_id, "MODERATOR", id())).await.email,
            ""
        );
        assert_eq!(
            get(as_user(&alice.user_id, "USER", id())).await.email,
            "alice@example.org"
        );
        assert_eq!(
            get(as_user(&root.user_id, "ADMIN", id())).await.email,
            "alice@example.org"
        );
        // A token claiming ADMIN whose user is not (any more) an admin sees no email.
        assert_eq!(get(as_user(&bob.user_id, "ADMIN", id())).await.email, "");
        assert_eq!(get(as_user("deleted-admin", "ADMIN", id())).await.email, "");

        // Batch: found users in request order, unknown ids left out, same email rule.
        let batch = svc
            .batch_get_users(as_user(
                &alice.user_id,
                "USER",
                BatchGetUsersRequest {
                    user_ids: vec![
                        bob.user_id.clone(),
                        "missing".into(),
                        alice.user_id.clone(),
                        String::new(),
                    ],
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .users;
        let names: Vec<_> = batch.iter().map(|u| u.username.as_str()).collect();
        assert_eq!(names, vec!["bob", "alice"]);
        assert_eq!(batch[0].email, "");
        assert_eq!(batch[1].email, "alice@example.org");
        let empty = svc
            .batch_get_users(Request::new(BatchGetUsersRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert!(empty.users.is_empty());
    }
}

#[tokio::test]
async fn request_id_makes_create_idempotent() {
    let (svcs, _dir) = services("idempotent", config()).await;
    for svc in svcs {
        let req = CreateUserRequest {
            request_id: "req-1".into(),
            ..signup("carol")
        };
        let first = svc
            .create_user(Request::new(req.clone()))
            .await
            .unwrap()
            .into_inner();
        let again = svc
            .create_user(Request::new(req.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(first.user, again.user);

        // Concurrent retries agree on one user.
        let req2 = CreateUserRequest {
            request_id: "req-2".into(),
            ..signup("dave")
        };
        let (a, b) = tokio::join!(
            svc.create_user(Request::new(req2.clone())),
            svc.create_user(Request::new(req2.clone()))
        );
        assert_eq!(
            a.unwrap().into_inner().user.unwrap().user_id,
            b.unwrap().into_inner().user.unwrap().user_id
        );

        // The same id for a different signup is refused.
        let reused = svc
            .create_user(Request::new(CreateUserRequest {
                request_id: "req-1".into(),
                ..signup("erin")
            }))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&reused), vec!["request_id"]);
    }
}

#[tokio::test]
async fn bootstrap_admin_and_roles() {
    let (svcs, _dir) = services("roles", config()).await;
    for svc in svcs {
        let root = create(&svc, "root").await;
        assert_eq!(root.role, Role::Admin as i32);
        let alice = create(&svc, "alice").await;
        // Followed from now: the two creations above are not sent.
        let mut events = svc
            .watch_events(Request::new(WatchEventsRequest {
                from_now: true,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();

        let updated = svc
            .set_user_role(as_user(
                &root.user_id,
                "ADMIN",
                SetUserRoleRequest {
                    user_id: alice.user_id.clone(),
                    role: Role::Moderator as i32,
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(updated.role, Role::Moderator as i32);
        // The change is an event carrying the public view (no email).
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match event.event {
            Some(Event::UserUpdated(u)) => {
                let user = u.user.unwrap();
                assert_eq!(user.role, Role::Moderator as i32);
                assert_eq!(user.user_id, alice.user_id);
                assert_eq!(user.email, "", "events never carry emails");
            }
            other => panic!("unexpected event {other:?}"),
        }
        let token = login(&svc, "alice", PASSWORD).await.unwrap().access_token;
        assert_eq!(svc.verifier().verify(&token).unwrap().role, "MODERATOR");
    }
}

#[tokio::test]
async fn metacharacters_are_stored_verbatim() {
    let (svcs, _dir) = services("verbatim", config()).await;
    for svc in svcs {
        let nasty = "Robert'); DROP TABLE users;-- \"%_\\ 🦀";
        let user = svc
            .create_user(Request::new(CreateUserRequest {
                display_name: nasty.into(),
                password: "pässwörd'--".into(),
                ..signup("bobby")
            }))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        let fetched = svc
            .get_user(Request::new(GetUserRequest {
                user_id: user.user_id,
            }))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(fetched.display_name, nasty);
        login(&svc, "bobby", "pässwörd'--").await.unwrap();
    }
}

#[tokio::test]
async fn delete_removes_the_user_and_emits_events() {
    let (svcs, _dir) = services("delete", config()).await;
    for svc in svcs {
        // The admin's own creation is event 1; the events below come after it.
        let root = create(&svc, "root").await;
        let alice = create(&svc, "alice").await;
        let bob = create(&svc, "bob").await;
        let mut events = svc
            .watch_events(Request::new(WatchEventsRequest {
                after_sequence: 1,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();

        // Self-delete.
        svc.delete_user(as_user(
            &alice.user_id,
            "USER",
            DeleteUserRequest {
                user_id: alice.user_id.clone(),
            },
        ))
        .await
        .unwrap();
        // ADMIN deletes someone else.
        svc.delete_user(as_user(
            &root.user_id,
            "ADMIN",
            DeleteUserRequest {
                user_id: bob.user_id.clone(),
            },
        ))
        .await
        .unwrap();
        let gone = svc
            .get_user(Request::new(GetUserRequest {
                user_id: alice.user_id.clone(),
            }))
            .await
            .unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
        assert_eq!(
            login(&svc, "alice", PASSWORD).await.unwrap_err().code(),
            Code::Unauthenticated
        );

        let mut seen = Vec::new();
        for _ in 0..4 {
            let e = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(e.create_time.is_some());
            seen.push(e);
        }
        assert!(seen.windows(2).all(|w| w[0].sequence < w[1].sequence));
        match (&seen[0].event, &seen[2].event, &seen[3].event) {
            (
                Some(Event::UserCreated(c)),
                Some(Event::UserDeleted(d1)),
                Some(Event::UserDeleted(d2)),
            ) => {
                let u = c.user.as_ref().unwrap();
                assert_eq!(u.user_id, alice.user_id);
                assert_eq!(u.email, "", "events never carry emails");
                assert_eq!(d1.user_id, alice.user_id);
                assert_eq!(d2.user_id, bob.user_id);
            }
            other => panic!("unexpected events {other:?}"),
        }

        // Resuming from a cursor skips what was seen.
        let mut resumed = svc
            .watch_events(Request::new(WatchEventsRequest {
                after_sequence: seen[2].sequence,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let next = resumed.next().await.unwrap().unwrap();
        assert_eq!(next.sequence, seen[3].sequence);

        // The name is free again.
        create(&svc, "alice").await;
    }
}

#[tokio::test]
async fn signing_key_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.db");
    let path = path.to_str().unwrap();
    let svc = Users::open(path, config()).await.unwrap();
    create(&svc, "alice").await;
    let token = login(&svc, "alice", PASSWORD).await.unwrap().access_token;
    svc.db().close().await;
    drop(svc);

    let reopened = Users::open(path, config()).await.unwrap();
    assert!(reopened.verifier().verify(&token).is_ok());
    let jwks = reopened
        .get_jwks(Request::new(GetJwksRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwks.keys.len(), 1);
    assert_eq!(jwks.keys[0].kid, Verifier::peek_kid(&token).unwrap());
}
