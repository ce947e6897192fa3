//! Tessera end to end: the whole mesh started in-process on real sockets with real
//! certificates, driven the way its users drive it — end users through the gateway's public
//! port, workloads and operators on the internal mTLS ports, kubelet on the admin ports.
//!
//! Each test starts its own mesh (a fresh data dir, free ports) so the tests are independent
//! and run in parallel; waits for cross-service effects are bounded polls, never sleeps.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tessera::{
    comments::v1::{Comment, CreateCommentRequest, ListCommentsRequest},
    gateway::v1::GetPostThreadRequest,
    notifications::v1::{
        ListNotificationsRequest, ListNotificationsResponse, SubscribeNotificationsRequest,
    },
    posts::v1::{
        CreatePostRequest, DeletePostRequest, GetPostRequest, ListPostsRequest, Post,
        UpdatePostRequest, post_service_client::PostServiceClient,
    },
    users::v1::{
        CreateUserRequest, DeleteUserRequest, GetUserRequest,
        user_service_client::UserServiceClient,
    },
};
use tessera_mesh::{
    errors::violated_fields,
    token::{Signer, UserClaims},
};
use tessera_tests::{
    BOUND, TestMesh, TestUser, bearer, connect_tls, eventually, server_only_tls, spawn_mesh,
    tls_connect,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Status};

// ---------------------------------------------------------------------------------------
// Helpers over the public API
// ---------------------------------------------------------------------------------------

/// The code of a call that must fail.
fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(status) => status.code(),
    }
}

async fn create_post(mesh: &TestMesh, user: &TestUser, title: &str, request_id: &str) -> Post {
    mesh.posts()
        .create_post(bearer(
            &user.token,
            CreatePostRequest {
                title: title.into(),
                body: format!("The body of {title}."),
                tags: vec!["e2e".into()],
                request_id: request_id.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .post
        .unwrap()
}

async fn comment(mesh: &TestMesh, user: &TestUser, post_id: &str, body: &str) -> Comment {
    mesh.comments()
        .create_comment(bearer(
            &user.token,
            CreateCommentRequest {
                post_id: post_id.into(),
                body: body.into(),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .comment
        .unwrap()
}

async fn delete_post(mesh: &TestMesh, user: &TestUser, post_id: &str) -> Result<(), Status> {
    mesh.posts()
        .delete_post(bearer(
            &user.token,
            DeletePostRequest {
                post_id: post_id.into(),
            },
        ))
        .await
        .map(drop)
}

async fn get_post(mesh: &TestMesh, post_id: &str) -> Result<Post, Status> {
    Ok(mesh
        .posts()
        .get_post(GetPostRequest {
            post_id: post_id.into(),
        })
        .await?
        .into_inner()
        .post
        .unwrap_or_default())
}

async fn posts_by(mesh: &TestMesh, user_id: &str) -> Result<Vec<Post>, Status> {
    Ok(mesh
        .posts()
        .list_posts(ListPostsRequest {
            author_id: user_id.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .posts)
}

async fn comments_on(mesh: &TestMesh, post_id: &str) -> Result<Vec<Comment>, Status> {
    Ok(mesh
        .comments()
        .list_comments(ListCommentsRequest {
            post_id: post_id.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .comments)
}

async fn notifications_of(
    mesh: &TestMesh,
    user: &TestUser,
) -> Result<ListNotificationsResponse, Status> {
    Ok(mesh
        .notifications()
        .list_notifications(bearer(
            &user.token,
            ListNotificationsRequest {
                page_size: 100,
                page_token: String::new(),
                unread_only: false,
            },
        ))
        .await?
        .into_inner())
}

fn comment_ids_of(list: &ListNotificationsResponse) -> Vec<String> {
    list.notifications
        .iter()
        .map(|n| n.comment_id.clone())
        .collect()
}

fn ids(comments: &[Comment]) -> BTreeSet<String> {
    comments.iter().map(|c| c.comment_id.clone()).collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------
// The main story: sign up, post, comment, get notified, read the thread, restart.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_is_notified_threaded_and_survives_a_restart() {
    let mut mesh = spawn_mesh().await;
    let alice = mesh.sign_up("alice", "Alice Author").await;
    let bob = mesh.sign_up("bob", "Bob Builder").await;
    assert_ne!(alice.user_id, bob.user_id);

    let post = create_post(&mesh, &alice, "Hello, mesh", "").await;
    assert_eq!(
        post.author_id, alice.user_id,
        "the author is the token's user"
    );

    // Alice listens before Bob comments.
    let mut stream = mesh
        .notifications()
        .subscribe_notifications(bearer(&alice.token, SubscribeNotificationsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = comment(&mesh, &bob, &post.post_id, "Nice post, Alice!").await;
    assert_eq!(first.author_id, bob.user_id);

    let live = tokio::time::timeout(BOUND, stream.message())
        .await
        .expect("no notification on the open stream in time")
        .unwrap()
        .expect("the stream ended")
        .notification
        .unwrap();
    assert_eq!(live.comment_id, first.comment_id);
    assert_eq!(live.post_id, post.post_id);
    assert_eq!(live.actor_id, bob.user_id);
    assert!(!live.read);

    // Streamed notifications are committed ones: the list has it too.
    let listed = notifications_of(&mesh, &alice).await.unwrap();
    assert_eq!(listed.unread_count, 1);
    assert_eq!(comment_ids_of(&listed), vec![first.comment_id.clone()]);
    assert_eq!(
        listed.notifications[0].notification_id,
        live.notification_id
    );
    // Bob commented; nobody told Bob anything.
    let bobs = notifications_of(&mesh, &bob).await.unwrap();
    assert_eq!((bobs.unread_count, bobs.notifications.len()), (0, 0));

    // The thread, read anonymously: post, its author, the comment and its author.
    let thread = mesh
        .feed()
        .get_post_thread(GetPostThreadRequest {
            post_id: post.post_id.clone(),
            comment_page_size: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(thread.post.as_ref().unwrap().post_id, post.post_id);
    assert_eq!(thread.post.as_ref().unwrap().title, "Hello, mesh");
    let author = thread.author.unwrap();
    assert_eq!(author.user_id, alice.user_id);
    assert_eq!(author.display_name, "Alice Author");
    assert_eq!(author.email, "", "an anonymous reader must not see emails");
    assert_eq!(thread.comments.len(), 1);
    let entry = &thread.comments[0];
    assert_eq!(entry.comment.as_ref().unwrap().comment_id, first.comment_id);
    assert_eq!(entry.comment.as_ref().unwrap().body, "Nice post, Alice!");
    assert_eq!(entry.author.as_ref().unwrap().user_id, bob.user_id);
    assert_eq!(entry.author.as_ref().unwrap().display_name, "Bob Builder");
    assert!(thread.next_comment_page_token.is_empty());

    // Stop everything and start again on the same data dir. The open stream does not hold
    // up the drain, and it ends rather than hanging.
    mesh.restart().await;
    let ended = tokio::time::timeout(BOUND, stream.message())
        .await
        .expect("the stream outlived the mesh");
    assert!(
        !matches!(ended, Ok(Some(_))),
        "a notification after shutdown: {ended:?}"
    );

    // Accounts, tokens, posts and comments are all still there.
    let relogged = mesh.log_in("alice", &alice.password).await.unwrap();
    assert_eq!(relogged.user.unwrap().user_id, alice.user_id);
    assert!(mesh.log_in("bob", &bob.password).await.is_ok());
    assert_eq!(
        code(mesh.log_in("bob", "not bob's password").await),
        Code::Unauthenticated
    );
    let after = get_post(&mesh, &post.post_id).await.unwrap();
    assert_eq!(after, post, "the post came back unchanged");
    assert_eq!(
        posts_by(&mesh, &alice.user_id).await.unwrap(),
        vec![post.clone()]
    );
    assert_eq!(
        comments_on(&mesh, &post.post_id).await.unwrap(),
        vec![first.clone()]
    );
    // Tokens issued before the restart still verify (the signing key is persisted).
    let listed = notifications_of(&mesh, &alice).await.unwrap();
    assert_eq!(listed.unread_count, 1);
    assert_eq!(comment_ids_of(&listed), vec![first.comment_id.clone()]);

    // No event takes effect twice: once the consumers have caught up past a fresh marker
    // comment, Alice has exactly the old notification plus the marker's.
    let mut stream = mesh
        .notifications()
        .subscribe_notifications(bearer(&alice.token, SubscribeNotificationsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let marker = comment(&mesh, &bob, &post.post_id, "Still here after the restart").await;
    let live = tokio::time::timeout(BOUND, stream.message())
        .await
        .expect("no notification on the stream after the restart")
        .unwrap()
        .expect("the stream ended")
        .notification
        .unwrap();
    assert_eq!(live.comment_id, marker.comment_id);
    let listed = eventually(BOUND, async || {
        let listed = notifications_of(&mesh, &alice).await?;
        anyhow::ensure!(
            comment_ids_of(&listed).contains(&marker.comment_id),
            "no notification for the marker yet: {listed:?}"
        );
        Ok(listed)
    })
    .await;
    let mut got = comment_ids_of(&listed);
    got.sort();
    let mut want = vec![first.comment_id.clone(), marker.comment_id.clone()];
    want.sort();
    assert_eq!(got, want, "each comment notifies exactly once");
    assert_eq!(listed.unread_count, 2);
    assert_eq!(
        ids(&comments_on(&mesh, &post.post_id).await.unwrap()),
        ids(&[first, marker])
    );

    mesh.shutdown().await;
    let ended = tokio::time::timeout(BOUND, stream.message())
        .await
        .expect("the stream outlived the mesh");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
}

// ---------------------------------------------------------------------------------------
// Cascades: deleting a post or a user cleans up after it, across services.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_post_or_a_user_cascades() {
    let mesh = spawn_mesh().await;
    let alice = mesh.sign_up("alice", "Alice").await;
    let bob = mesh.sign_up("bob", "Bob").await;

    // A deleted post takes its comments (and their notifications) with it.
    let doomed = create_post(&mesh, &alice, "Soon gone", "").await;
    comment(&mesh, &bob, &doomed.post_id, "first").await;
    comment(&mesh, &bob, &doomed.post_id, "second").await;
    assert_eq!(comments_on(&mesh, &doomed.post_id).await.unwrap().len(), 2);
    eventually!(notifications_of(&mesh, &alice).await?.notifications.len() == 2);

    delete_post(&mesh, &alice, &doomed.post_id).await.unwrap();
    assert_eq!(code(get_post(&mesh, &doomed.post_id).await), Code::NotFound);
    eventually!(comments_on(&mesh, &doomed.post_id).await?.is_empty());
    eventually!(
        notifications_of(&mesh, &alice)
            .await?
            .notifications
            .is_empty()
    );
    assert_eq!(
        notifications_of(&mesh, &alice).await.unwrap().unread_count,
        0
    );

    // A deleted user takes their posts (and the comments on them) and their comments
    // elsewhere, and nothing of anyone else's.
    let alices = create_post(&mesh, &alice, "Alice's", "").await;
    let on_alices = comment(&mesh, &bob, &alices.post_id, "bob on alice's").await;
    let bobs = create_post(&mesh, &bob, "Bob's", "").await;
    let by_alice = comment(&mesh, &alice, &bobs.post_id, "alice on bob's").await;
    let by_bob = comment(&mesh, &bob, &bobs.post_id, "bob on his own").await;
    // Bob was notified of Alice's comment (not of his own).
    eventually!(
        comment_ids_of(&notifications_of(&mesh, &bob).await?) == [by_alice.comment_id.clone()]
    );
    assert_eq!(
        comment_ids_of(&notifications_of(&mesh, &alice).await.unwrap()),
        vec![on_alices.comment_id.clone()]
    );

    // Only Alice herself (or an admin) may delete Alice.
    assert_eq!(
        code(
            mesh.users()
                .delete_user(bearer(
                    &bob.token,
                    DeleteUserRequest {
                        user_id: alice.user_id.clone(),
                    },
                ))
                .await
        ),
        Code::PermissionDenied
    );
    mesh.users()
        .delete_user(bearer(
            &alice.token,
            DeleteUserRequest {
                user_id: alice.user_id.clone(),
            },
        ))
        .await
        .unwrap();

    eventually!(posts_by(&mesh, &alice.user_id).await?.is_empty());
    assert_eq!(code(get_post(&mesh, &alices.post_id).await), Code::NotFound);
    eventually!(comments_on(&mesh, &alices.post_id).await?.is_empty());
    eventually!(
        ids(&comments_on(&mesh, &bobs.post_id).await?) == ids(std::slice::from_ref(&by_bob))
    );
    eventually!(
        notifications_of(&mesh, &bob)
            .await?
            .notifications
            .is_empty()
    );
    // Bob's things stay.
    assert_eq!(get_post(&mesh, &bobs.post_id).await.unwrap(), bobs);
    assert_eq!(
        posts_by(&mesh, &bob.user_id).await.unwrap(),
        vec![bobs.clone()]
    );
    // Alice is gone: no login, no profile, and her still-unexpired token cannot post.
    assert_eq!(
        code(mesh.log_in("alice", &alice.password).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            mesh.users()
                .get_user(GetUserRequest {
                    user_id: alice.user_id.clone(),
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            mesh.posts()
                .create_post(bearer(
                    &alice.token,
                    CreatePostRequest {
                        title: "from beyond".into(),
                        body: "boo".into(),
                        tags: vec![],
                        request_id: String::new(),
                    },
                ))
                .await
        ),
        Code::FailedPrecondition
    );

    mesh.shutdown().await;
}

/// A follower that names the kinds it wants gets only those, and progress markers for the
/// rest: comments asks posts for deletions only, and its cursor still reaches the end of a
/// run of new posts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_gets_only_the_kinds_it_names_and_its_cursor_keeps_up() {
    use tessera::posts::v1::{WatchEventsRequest, watch_events_response::Event};

    let mesh = spawn_mesh().await;
    let alice = mesh.sign_up("alice", "Alice").await;
    let doomed = create_post(&mesh, &alice, "Soon gone", "").await;
    delete_post(&mesh, &alice, &doomed.post_id).await.unwrap();
    for i in 0..3 {
        create_post(&mesh, &alice, &format!("Kept {i}"), "").await;
    }

    // As comments' workload over mTLS, the way its consumer asks: PostDeleted is field 4.
    let channel = mesh.internal_channel("comments", "posts").await.unwrap();
    let mut posts = PostServiceClient::new(channel);
    let mut stream = posts
        .watch_events(WatchEventsRequest {
            event_fields: vec![4],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    async fn next(
        stream: &mut tonic::Streaming<tessera::posts::v1::WatchEventsResponse>,
    ) -> tessera::posts::v1::WatchEventsResponse {
        tokio::time::timeout(BOUND, stream.message())
            .await
            .expect("an event within the bound")
            .unwrap()
            .unwrap()
    }
    let deleted = next(&mut stream).await;
    assert_eq!(deleted.sequence, 2);
    assert!(
        matches!(&deleted.event, Some(Event::PostDeleted(d)) if d.post_id == doomed.post_id),
        "{deleted:?}"
    );
    let marker = next(&mut stream).await;
    assert_eq!(
        (marker.sequence, marker.event),
        (5, None),
        "the three creations"
    );
    assert_eq!(marker.epoch, deleted.epoch);
    drop(stream);

    // A kind that is not an event is refused, naming the field.
    let err = posts
        .watch_events(WatchEventsRequest {
            event_fields: vec![4, 7],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["event_fields[1]"]);

    // comments' own consumer, following with the same filter, wrote its cursor past them.
    let comments_db = mesh.data_dir().join("comments.db");
    let db = tessera_store::Db::open(comments_db.to_str().unwrap(), &[])
        .await
        .unwrap();
    eventually!(db.cursor("posts-events").await? == 5);
    db.close().await;
    mesh.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Write rules: idempotent creates, optimistic updates, ownership, validation.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_idempotent_optimistic_owned_and_validated() {
    let mesh = spawn_mesh().await;
    let alice = mesh.sign_up("alice", "Alice").await;
    let bob = mesh.sign_up("bob", "Bob").await;

    // The same request_id twice is one post; another request_id is another post; the same
    // request_id from someone else is their own post.
    let once = create_post(&mesh, &alice, "Once", "req-1").await;
    let again = create_post(&mesh, &alice, "Once", "req-1").await;
    assert_eq!(again.post_id, once.post_id);
    assert_eq!(posts_by(&mesh, &alice.user_id).await.unwrap().len(), 1);
    let other = create_post(&mesh, &alice, "Twice", "req-2").await;
    assert_ne!(other.post_id, once.post_id);
    let bobs = create_post(&mesh, &bob, "Bob's once", "req-1").await;
    assert_ne!(bobs.post_id, once.post_id);
    assert_eq!(bobs.author_id, bob.user_id);
    assert_eq!(posts_by(&mesh, &alice.user_id).await.unwrap().len(), 2);

    // Optimistic concurrency: an update needs the current etag and produces a new one.
    let update = |title: &str, etag: &str, token: &str| {
        bearer(
            token,
            UpdatePostRequest {
                post: Some(Post {
                    post_id: once.post_id.clone(),
                    title: title.into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types_field_mask(&["title"])),
                etag: etag.into(),
            },
        )
    };
    let updated = mesh
        .posts()
        .update_post(update("Once, edited", &once.etag, &alice.token))
        .await
        .unwrap()
        .into_inner()
        .post
        .unwrap();
    assert_eq!(updated.title, "Once, edited");
    assert_eq!(updated.body, once.body, "the mask left the body alone");
    assert_ne!(updated.etag, once.etag);
    let stale = mesh
        .posts()
        .update_post(update("Lost update", &once.etag, &alice.token))
        .await;
    assert_eq!(code(stale), Code::Aborted);
    assert_eq!(get_post(&mesh, &once.post_id).await.unwrap(), updated);

    // Only the author edits or deletes (Bob even has the current etag).
    let foreign = mesh
        .posts()
        .update_post(update("Bob was here", &updated.etag, &bob.token))
        .await;
    assert_eq!(code(foreign), Code::PermissionDenied);
    let foreign_delete = delete_post(&mesh, &bob, &once.post_id).await;
    assert_eq!(code(foreign_delete), Code::PermissionDenied);
    assert_eq!(get_post(&mesh, &once.post_id).await.unwrap(), updated);

    // Unknown ids.
    assert_eq!(code(get_post(&mesh, "no-such-post").await), Code::NotFound);
    let on_nothing = mesh
        .comments()
        .create_comment(bearer(
            &bob.token,
            CreateCommentRequest {
                post_id: "no-such-post".into(),
                body: "hello?".into(),
                request_id: String::new(),
            },
        ))
        .await;
    assert_eq!(code(on_nothing), Code::NotFound);

    // Validation errors name their fields, and the details survive the gateway hop.
    let invalid = mesh
        .users()
        .create_user(CreateUserRequest {
            username: "ab".into(),
            email: "not an email".into(),
            password: "long enough password".into(),
            display_name: "Shorty".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let fields = violated_fields(&invalid);
    assert!(fields.contains(&"username".to_owned()), "{invalid:?}");
    assert!(fields.contains(&"email".to_owned()), "{invalid:?}");
    assert!(!fields.contains(&"password".to_owned()), "{invalid:?}");
    let untitled = mesh
        .posts()
        .create_post(bearer(
            &alice.token,
            CreatePostRequest {
                title: String::new(),
                body: "no title".into(),
                tags: vec![],
                request_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(untitled.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&untitled), ["title"], "{untitled:?}");

    mesh.shutdown().await;
}

fn prost_types_field_mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    }
}

// ---------------------------------------------------------------------------------------
// The gateway as the first line: tokens and the public surface.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_rejects_bad_tokens_and_non_public_methods() {
    let mesh = spawn_mesh().await;
    let alice = mesh.sign_up("alice", "Alice").await;
    let new_post = || CreatePostRequest {
        title: "Mine".into(),
        body: "Really mine.".into(),
        tags: vec![],
        request_id: String::new(),
    };

    // No token where one is needed.
    let missing = mesh.posts().create_post(new_post()).await;
    assert_eq!(code(missing), Code::Unauthenticated);

    // A well-formed token from a key the mesh does not trust.
    let stranger = Signer::generate().unwrap();
    let (forged, _) = stranger.sign(&alice.user_id, "ADMIN", Duration::from_secs(3600));
    let result = mesh.posts().create_post(bearer(&forged, new_post())).await;
    assert_eq!(code(result), Code::Unauthenticated);

    // Alice's real header (the trusted key id) over claims and a signature of our making.
    let header = alice.token.split('.').next().unwrap();
    let rest = forged.split_once('.').unwrap().1;
    let spliced = format!("{header}.{rest}");
    let result = mesh.posts().create_post(bearer(&spliced, new_post())).await;
    assert_eq!(code(result), Code::Unauthenticated);

    // Expired (signed by a random key: the users key is out of reach, and the gateway must
    // say no either way).
    let now = now_secs();
    let expired = stranger.sign_claims(&UserClaims {
        sub: alice.user_id.clone(),
        role: "USER".into(),
        exp: now - 60,
        iat: now - 3660,
    });
    let result = mesh.posts().create_post(bearer(&expired, new_post())).await;
    assert_eq!(code(result), Code::Unauthenticated);

    // Garbage, also on a method that needs no token: a bad token is never ignored.
    let result = mesh
        .posts()
        .create_post(bearer("garbage", new_post()))
        .await;
    assert_eq!(code(result), Code::Unauthenticated);
    let result = mesh
        .posts()
        .get_post(bearer(
            "garbage",
            GetPostRequest {
                post_id: "x".into(),
            },
        ))
        .await;
    assert_eq!(code(result), Code::Unauthenticated);

    // Nothing above created anything; the real token does.
    assert!(posts_by(&mesh, &alice.user_id).await.unwrap().is_empty());
    let mine = create_post(&mesh, &alice, "Mine", "").await;
    assert_eq!(posts_by(&mesh, &alice.user_id).await.unwrap(), [mine]);

    // Methods not marked public do not exist at the gateway, token or not.
    let watch = mesh
        .users()
        .watch_events(tessera::users::v1::WatchEventsRequest {
            after_sequence: 0,
            ..Default::default()
        })
        .await;
    assert_eq!(code(watch), Code::Unimplemented);
    let watch = mesh
        .posts()
        .watch_events(bearer(
            &alice.token,
            tessera::posts::v1::WatchEventsRequest {
                after_sequence: 0,
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(code(watch), Code::Unimplemented);

    mesh.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The internal ports (mTLS, caller identity from the certificate) and the admin ports.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_ports_check_the_caller_and_admin_ports_report_health() {
    let mesh = spawn_mesh().await;
    let alice = mesh.sign_up("alice", "Alice").await;
    let post = create_post(&mesh, &alice, "Internal", "").await;
    let get = || GetPostRequest {
        post_id: post.post_id.clone(),
    };

    // The gateway's certificate may read posts directly.
    let as_gateway = mesh.internal_channel("gateway", "posts").await.unwrap();
    let got = PostServiceClient::new(as_gateway)
        .get_post(get())
        .await
        .unwrap()
        .into_inner()
        .post
        .unwrap();
    assert_eq!(got, post);

    // The notifications workload may not delete users, even carrying a valid user token
    // for the very user it names.
    let as_notifications = mesh
        .internal_channel("notifications", "users")
        .await
        .unwrap();
    let denied = UserServiceClient::new(as_notifications)
        .delete_user(bearer(
            &alice.token,
            DeleteUserRequest {
                user_id: alice.user_id.clone(),
            },
        ))
        .await;
    assert_eq!(code(denied), Code::PermissionDenied);
    assert!(
        mesh.log_in("alice", &alice.password).await.is_ok(),
        "alice must still exist"
    );

    // No client certificate, no conversation: the server aborts the handshake.
    let ca = mesh.certs_dir().join("ca.crt");
    let no_cert = server_only_tls(&ca).unwrap();
    let attempt = async {
        let mut tls = tls_connect(mesh.grpc_addr("posts"), no_cert.clone()).await?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        tls.flush().await?;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await
    };
    let outcome = tokio::time::timeout(BOUND, attempt).await.unwrap();
    let err = outcome.expect_err("a client without a certificate got an answer");
    assert!(
        format!("{err:?}").contains("CertificateRequired"),
        "unexpected failure: {err:?}"
    );
    // And through a gRPC client: connecting or calling fails, nothing is served.
    let call = match connect_tls(mesh.grpc_addr("posts"), no_cert).await {
        Err(err) => Err(format!("{err:#}")),
        Ok(channel) => PostServiceClient::new(channel)
            .get_post(get())
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}")),
    };
    assert!(call.is_err(), "a client without a certificate was served");

    // Admin ports: readiness and liveness for every service, and nothing else.
    assert_eq!(mesh.services().len(), 5);
    for service in mesh.services() {
        let admin = mesh.admin_addr(&service).to_string();
        for check in ["readiness", "liveness"] {
            let status = tessera_cli::probe::probe(&admin, check, Duration::from_secs(5)).await;
            assert_eq!(status.as_deref(), Ok("SERVING"), "{service} {check}");
        }
    }
    let admin =
        tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.admin_addr("posts")))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let on_admin = PostServiceClient::new(admin).get_post(get()).await;
    assert_eq!(code(on_admin), Code::Unimplemented);

    check_endpoints_json(&mesh);

    let admin_posts = mesh.admin_addr("posts").to_string();
    mesh.shutdown().await;
    assert!(
        tessera_cli::probe::probe(&admin_posts, "liveness", Duration::from_secs(2))
            .await
            .is_err(),
        "the admin port still answers after shutdown"
    );
}

/// `endpoints.json` has the documented shape, and says where things really are.
fn check_endpoints_json(mesh: &TestMesh) {
    let text = std::fs::read_to_string(mesh.endpoints_path()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let path = |v: &serde_json::Value| {
        let p = Path::new(v.as_str().unwrap_or_else(|| panic!("{v} is not a path")));
        assert!(p.is_absolute(), "{} is not absolute", p.display());
        assert!(p.is_file(), "{} does not exist", p.display());
        p.to_owned()
    };
    assert_eq!(path(&json["ca"]), mesh.certs_dir().join("ca.crt"));
    path(&json["operator"]["cert"]);
    path(&json["operator"]["key"]);
    let services = json["services"].as_object().unwrap();
    assert_eq!(services.keys().cloned().collect::<Vec<_>>(), {
        let mut names = mesh.services();
        names.sort();
        names
    });
    for (name, entry) in services {
        assert_eq!(entry["grpc"], mesh.grpc_addr(name).to_string(), "{name}");
        assert_eq!(entry["admin"], mesh.admin_addr(name).to_string(), "{name}");
        assert_eq!(
            entry["identity"],
            format!("spiffe://tessera.local/ns/tessera/sa/{name}"),
            "{name}"
        );
        if name == "gateway" {
            assert_eq!(entry["public"], mesh.public_addr().to_string());
        } else {
            assert!(entry.get("public").is_none(), "{name} has a public port");
        }
    }
}
