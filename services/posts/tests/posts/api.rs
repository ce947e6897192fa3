//! PostService handlers called directly (no sockets), on SQLite and, when
//! `TESSERA_TEST_DATABASE_URL` is set, on PostgreSQL; plus the users → posts cascade over an
//! in-process channel.

use std::{collections::HashSet, time::Duration};

use futures::StreamExt;
use tessera::{
    posts::v1::{
        CreatePostRequest, DeletePostRequest, UpdatePostRequest, WatchEventsRequest,
        post_service_server::PostService, watch_events_response::Event,
    },
    users::v1::{
        CreateUserRequest, DeleteUserRequest,
        user_service_server::{UserService, UserServiceServer},
    },
};
use tessera_posts::{MIGRATIONS, Posts};
use tessera_store::testing;
use tessera_testing::{as_user, eventually};
use tonic::{Code, Request};

use crate::support::*;

#[tokio::test]
async fn create_get_update_delete() {
    let (svcs, _dir) = services("crud").await;
    for svc in svcs {
        let post = create(&svc, "alice", "Hello").await;
        assert_eq!(post.author_id, "alice");
        assert_eq!(post.tags, vec!["rust", "grpc"]);
        assert!(!post.etag.is_empty());
        assert_eq!(post.create_time, post.update_time);
        assert_eq!(get(&svc, &post.post_id).await.unwrap(), post);

        // Only the title changes; body and tags stay; a new etag.
        let mut patch = post.clone();
        patch.title = "Hello again".into();
        patch.body = "ignored".into();
        let updated = edit(
            &svc,
            "alice",
            "USER",
            update(&patch, &["title"], &post.etag),
        )
        .await
        .unwrap();
        assert_eq!(updated.title, "Hello again");
        assert_eq!(updated.body, post.body);
        assert_eq!(updated.tags, post.tags);
        assert_ne!(updated.etag, post.etag);
        assert_eq!(get(&svc, &post.post_id).await.unwrap(), updated);

        // An empty mask replaces all three; a MODERATOR may edit others' posts.
        let mut patch = updated.clone();
        patch.title = "Moderated".into();
        patch.body = String::new();
        patch.tags = vec![];
        let moderated = edit(&svc, "mod", "MODERATOR", update(&patch, &[], &updated.etag))
            .await
            .unwrap();
        assert_eq!(
            (moderated.title.as_str(), moderated.body.as_str()),
            ("Moderated", "")
        );
        assert!(moderated.tags.is_empty());
        assert_eq!(
            moderated.author_id, "alice",
            "editing does not change the author"
        );

        delete(&svc, "alice", "USER", &post.post_id).await.unwrap();
        assert_eq!(
            get(&svc, &post.post_id).await.unwrap_err().code(),
            Code::NotFound
        );

        // A demoted moderator or a deleted admin, with tokens that still claim the role, may
        // neither edit nor delete others' posts: the stored role decides.
        let other = create(&svc, "bob", "Bob's").await;
        for (who, role) in [("stale", "MODERATOR"), ("gone", "ADMIN")] {
            let refused = edit(&svc, who, role, update(&other, &[], &other.etag))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{who} edits");
            let refused = delete(&svc, who, role, &other.post_id).await.unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{who} deletes");
        }

        // ADMIN may delete anyone's.
        delete(&svc, "root", "ADMIN", &other.post_id).await.unwrap();
    }
}

#[tokio::test]
async fn bad_inputs_are_rejected_with_the_right_code() {
    let (svcs, _dir) = services("bad_inputs").await;
    for svc in svcs {
        let post = create(&svc, "alice", "Mine").await;

        let cases: Vec<(&str, CreatePostRequest)> = vec![
            (
                "title",
                CreatePostRequest {
                    title: String::new(),
                    ..draft("x")
                },
            ),
            (
                "title",
                CreatePostRequest {
                    title: "   ".into(),
                    ..draft("x")
                },
            ),
            (
                "title",
                CreatePostRequest {
                    title: "t".repeat(201),
                    ..draft("x")
                },
            ),
            (
                "title",
                CreatePostRequest {
                    title: "a\u{7}b".into(),
                    ..draft("x")
                },
            ),
            (
                "body",
                CreatePostRequest {
                    body: "b".repeat(64 * 1024 + 1),
                    ..draft("x")
                },
            ),
            (
                "tags",
                CreatePostRequest {
                    tags: vec!["t".into(); 11],
                    ..draft("x")
                },
            ),
            (
                "tags[1]",
                CreatePostRequest {
                    tags: vec!["ok".into(), String::new()],
                    ..draft("x")
                },
            ),
            (
                "tags[0]",
                CreatePostRequest {
                    tags: vec!["t".repeat(33)],
                    ..draft("x")
                },
            ),
            (
                "request_id",
                CreatePostRequest {
                    request_id: "r".repeat(129),
                    ..draft("x")
                },
            ),
        ];
        for (field, req) in cases {
            assert_invalid(svc.create_post(as_user("alice", "USER", req)).await, field);
        }
        // Limits are inclusive.
        svc.create_post(as_user(
            "alice",
            "USER",
            CreatePostRequest {
                title: "é".repeat(200),
                body: "b".repeat(64 * 1024),
                tags: (0..10).map(|i| format!("{i}{}", "t".repeat(31))).collect(),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap();

        let anonymous = svc.create_post(Request::new(draft("x"))).await.unwrap_err();
        assert_eq!(anonymous.code(), Code::Unauthenticated);

        assert_eq!(
            get(&svc, "no-such-post").await.unwrap_err().code(),
            Code::NotFound
        );
        assert_invalid(get(&svc, "").await, "post_id");

        assert_invalid(list(&svc, "", -1, "").await, "page_size");
        assert_invalid(list(&svc, "", 10, "garbage!!").await, "page_token");
        assert_invalid(list(&svc, "", 10, "bm90IGEgdG9rZW4").await, "page_token");

        // Updates.
        let mut patch = post.clone();
        patch.title = "Theirs now".into();
        let denied = edit(&svc, "bob", "USER", update(&patch, &["title"], &post.etag))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        let ok = edit(
            &svc,
            "alice",
            "USER",
            update(&patch, &["title"], &post.etag),
        )
        .await
        .unwrap();
        let stale = edit(
            &svc,
            "alice",
            "USER",
            update(&patch, &["title"], &post.etag),
        )
        .await
        .unwrap_err();
        assert_eq!(stale.code(), Code::Aborted);
        let fresh = ok.etag;
        assert_invalid(
            edit(&svc, "alice", "USER", update(&patch, &["title"], "")).await,
            "etag",
        );
        assert_invalid(
            edit(
                &svc,
                "alice",
                "USER",
                update(&patch, &["author_id"], &fresh),
            )
            .await,
            "update_mask.paths",
        );
        let mut empty_title = patch.clone();
        empty_title.title.clear();
        assert_invalid(
            edit(
                &svc,
                "alice",
                "USER",
                update(&empty_title, &["title"], &fresh),
            )
            .await,
            "post.title",
        );
        // Not in the mask: not validated, not changed.
        edit(
            &svc,
            "alice",
            "USER",
            update(&empty_title, &["body"], &fresh),
        )
        .await
        .unwrap();
        assert_invalid(
            edit(
                &svc,
                "alice",
                "USER",
                UpdatePostRequest {
                    post: None,
                    update_mask: None,
                    etag: "x".into(),
                },
            )
            .await,
            "post",
        );
        let mut unknown = patch.clone();
        unknown.post_id = "no-such-post".into();
        assert_eq!(
            edit(&svc, "alice", "USER", update(&unknown, &[], "e"))
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );

        // Deletes.
        let denied = delete(&svc, "bob", "USER", &post.post_id)
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        let unknown = delete(&svc, "alice", "USER", "nope").await.unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);
        assert_eq!(
            svc.delete_post(Request::new(DeletePostRequest {
                post_id: post.post_id.clone()
            }))
            .await
            .unwrap_err()
            .code(),
            Code::Unauthenticated
        );
        assert!(get(&svc, &post.post_id).await.is_ok(), "still there");

        let negative = svc
            .watch_events(Request::new(WatchEventsRequest {
                after_sequence: -5,
                ..Default::default()
            }))
            .await
            .map(|_| ());
        assert_invalid(negative, "after_sequence");
    }
}

#[tokio::test]
async fn request_id_makes_create_idempotent_per_author() {
    let (svcs, _dir) = services("idempotent").await;
    for svc in svcs {
        let req = CreatePostRequest {
            request_id: "r1".into(),
            ..draft("Once")
        };
        let a = svc
            .create_post(as_user("alice", "USER", req.clone()))
            .await
            .unwrap();
        let b = svc
            .create_post(as_user("alice", "USER", req.clone()))
            .await
            .unwrap();
        assert_eq!(a.into_inner().post, b.into_inner().post);
        // Concurrent retries agree too.
        let req2 = CreatePostRequest {
            request_id: "r2".into(),
            ..draft("Twice")
        };
        let (c, d) = tokio::join!(
            svc.create_post(as_user("alice", "USER", req2.clone())),
            svc.create_post(as_user("alice", "USER", req2.clone()))
        );
        assert_eq!(c.unwrap().into_inner().post, d.unwrap().into_inner().post);
        // The same id from another author is another post.
        svc.create_post(as_user("bob", "USER", req)).await.unwrap();
        let (alices, _) = list(&svc, "alice", 100, "").await.unwrap();
        assert_eq!(alices.len(), 2);
        let (all, _) = list(&svc, "", 100, "").await.unwrap();
        assert_eq!(all.len(), 3);
    }
}

#[tokio::test]
async fn sql_metacharacters_are_stored_verbatim() {
    let (svcs, _dir) = services("verbatim").await;
    for svc in svcs {
        let nasty = "x'); DROP TABLE posts; -- \"%_\\ $1 ?";
        let post = svc
            .create_post(as_user(
                "o'brien",
                "USER",
                CreatePostRequest {
                    title: nasty.into(),
                    body: format!("{nasty}\n\u{1F980}"),
                    tags: vec!["'; --".into(), "\"[]\"".into()],
                    request_id: nasty.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .post
            .unwrap();
        let fetched = get(&svc, &post.post_id).await.unwrap();
        assert_eq!(fetched.title, nasty);
        assert_eq!(fetched.body, format!("{nasty}\n\u{1F980}"));
        assert_eq!(fetched.tags, vec!["'; --", "\"[]\""]);
        let (by_author, _) = list(&svc, "o'brien", 10, "").await.unwrap();
        assert_eq!(by_author.len(), 1);
    }
}

#[tokio::test]
async fn pages_stay_correct_while_posts_are_added() {
    let (svcs, _dir) = services("pages").await;
    for svc in svcs {
        let mut originals = Vec::new();
        for i in 0..25 {
            let author = if i % 2 == 0 { "even" } else { "odd" };
            originals.push(create(&svc, author, &format!("post {i}")).await.post_id);
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = list(&svc, "", 10, &token).await.unwrap();
            assert!(page.len() <= 10);
            seen.extend(page.iter().map(|p| p.post_id.clone()));
            // New posts land before the cursor and must not disturb later pages.
            create(&svc, "even", "interloper").await;
            if next.is_empty() {
                break;
            }
            token = next;
        }
        let expected: Vec<String> = originals.iter().rev().cloned().collect();
        assert_eq!(seen, expected, "newest first, each exactly once");

        // Author filter; the token is bound to the filter.
        let (odd, next) = list(&svc, "odd", 5, "").await.unwrap();
        assert_eq!(odd.len(), 5);
        assert!(odd.iter().all(|p| p.author_id == "odd"));
        assert_invalid(list(&svc, "even", 5, &next).await, "page_token");
        assert_invalid(list(&svc, "", 5, &next).await, "page_token");
        let (rest, last) = list(&svc, "odd", 100, &next).await.unwrap();
        assert_eq!(rest.len(), 7);
        assert!(last.is_empty());
        let ids: HashSet<_> = odd.iter().chain(&rest).map(|p| &p.post_id).collect();
        assert_eq!(ids.len(), 12);

        // Default and maximum page sizes.
        for _ in 0..80 {
            create(&svc, "bulk", "bulk").await;
        }
        let (default_page, _) = list(&svc, "", 0, "").await.unwrap();
        assert_eq!(default_page.len(), 20);
        let (max_page, next) = list(&svc, "", 1000, "").await.unwrap();
        assert_eq!(max_page.len(), 100);
        assert!(!next.is_empty());
    }
}

#[tokio::test]
async fn watch_events_streams_creates_and_deletes() {
    let (svcs, _dir) = services("events").await;
    for svc in svcs {
        let post = create(&svc, "alice", "Evented").await;
        let mut events = svc
            .watch_events(Request::new(WatchEventsRequest {
                after_sequence: 0,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let first = events.next().await.unwrap().unwrap();
        match first.event {
            Some(Event::PostCreated(c)) => assert_eq!(c.post.unwrap(), post),
            other => panic!("{other:?}"),
        }
        delete(&svc, "alice", "USER", &post.post_id).await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(second.sequence > first.sequence);
        match second.event {
            Some(Event::PostDeleted(d)) => {
                assert_eq!(
                    (d.post_id.as_str(), d.author_id.as_str()),
                    (post.post_id.as_str(), "alice")
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn a_follower_from_now_sees_edits_and_no_backlog() {
    let (svcs, _dir) = services("events_from_now").await;
    for svc in svcs {
        let post = create(&svc, "alice", "Before").await;
        let mut events = svc
            .watch_events(Request::new(WatchEventsRequest {
                from_now: true,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let mut changed = post.clone();
        changed.title = "After".into();
        let edited = edit(
            &svc,
            "alice",
            "USER",
            update(&changed, &["title"], &post.etag),
        )
        .await
        .unwrap();
        // The creation came before the call: the first event is the edit, with the post as
        // it is now.
        let first = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match first.event {
            Some(Event::PostUpdated(u)) => assert_eq!(u.post.unwrap(), edited),
            other => panic!("{other:?}"),
        }
        assert_eq!(edited.title, "After");
    }
}

#[tokio::test]
async fn deleting_a_user_deletes_their_posts() {
    let users_config = tessera_users::UsersConfig {
        password_params: argon2::Params::new(256, 1, 1, None).unwrap(),
        key_encryption_key: Some(tessera_users::Kek::generate().unwrap()),
        ..Default::default()
    };
    let user_dbs = testing::databases("cascade_users", tessera_users::MIGRATIONS).await;
    let post_dbs = testing::databases("cascade_posts", MIGRATIONS).await;
    for (udb, pdb) in user_dbs.iter().zip(&post_dbs) {
        let users = tessera_users::Users::with_db(udb.db.clone(), users_config.clone())
            .await
            .unwrap();
        let posts = Posts::with_db(pdb.db.clone()).await.unwrap();
        let signup = |name: &str| CreateUserRequest {
            username: name.into(),
            email: format!("{name}@example.org"),
            password: "long enough".into(),
            display_name: name.into(),
            request_id: String::new(),
        };
        let alice = users
            .create_user(Request::new(signup("alice")))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        let bob = users
            .create_user(Request::new(signup("bob")))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        let a1 = create(&posts, &alice.user_id, "a1").await;
        let a2 = create(&posts, &alice.user_id, "a2").await;
        let b1 = create(&posts, &bob.user_id, "b1").await;

        let channel = tessera_client::Channel::from_service(UserServiceServer::new(users.clone()));
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let consumer = tokio::spawn(tessera_posts::follow_user_events(
            posts.clone(),
            channel,
            shutdown,
        ));

        users
            .delete_user(as_user(
                &alice.user_id,
                "USER",
                DeleteUserRequest {
                    user_id: alice.user_id.clone(),
                },
            ))
            .await
            .unwrap();
        eventually!(
            get(&posts, &a1.post_id).await.is_err() && get(&posts, &a2.post_id).await.is_err(),
            "alice's posts are gone"
        );
        assert_eq!(
            get(&posts, &b1.post_id).await.unwrap(),
            b1,
            "bob's post stays"
        );

        // Each deleted post was announced, so comments can cascade in turn.
        let mut events = posts
            .watch_events(Request::new(WatchEventsRequest {
                after_sequence: 0,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let mut deleted = HashSet::new();
        for _ in 0..5 {
            let e = events.next().await.unwrap().unwrap();
            if let Some(Event::PostDeleted(d)) = e.event {
                assert_eq!(d.author_id, alice.user_id);
                deleted.insert(d.post_id);
            }
        }
        assert_eq!(
            deleted,
            HashSet::from([a1.post_id.clone(), a2.post_id.clone()])
        );

        // Alice's still-valid token cannot post any more.
        let after = posts
            .create_post(as_user(&alice.user_id, "USER", draft("ghost")))
            .await
            .unwrap_err();
        assert_eq!(after.code(), Code::FailedPrecondition);

        // The cursor is where the events ended, so a restart does not re-apply them.
        let cursor = posts
            .db()
            .cursor(tessera_posts::USER_EVENTS_CURSOR)
            .await
            .unwrap();
        assert_eq!(cursor, users.db().last_sequence().await.unwrap());

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), consumer)
            .await
            .unwrap()
            .unwrap();
    }
}
