//! CreateComment racing with the PostDeleted and UserDeleted cascades. On PostgreSQL (READ
//! COMMITTED) a create that checked the tombstone before the cascade wrote it, and committed
//! after the cascade's DELETE took its snapshot, would leave a comment on a deleted post
//! behind; the key locks make the two wait for each other instead. SQLite serializes writers,
//! so there it holds trivially; the test runs on both.

use std::{collections::BTreeSet, time::Instant};

use tessera::{
    comments::v1::CreateCommentRequest,
    posts::v1::{PostDeleted, WatchEventsResponse as PostEvent, watch_events_response::Event},
    users::v1::{
        UserDeleted, WatchEventsResponse as UserEvent, watch_events_response::Event as UserKind,
    },
};
use tessera_comments::{
    POST_EVENTS_CURSOR, USER_EVENTS_CURSOR, follow_post_events, follow_user_events,
};
use tokio::{sync::watch, task::JoinSet};
use tonic::Code;

use crate::support::{Harness, as_user, deleted_ids, eventually, harnesses, outbox};

/// Posts deleted while comments are being created on them.
const POSTS: usize = 40;
/// Concurrent creates per post.
const CREATES: usize = 4;

fn create(post: &str, n: usize) -> CreateCommentRequest {
    CreateCommentRequest {
        post_id: post.into(),
        body: format!("racing {n}"),
        request_id: String::new(),
    }
}

/// Fires `CREATES` creates on `post` by `author`; returns the ids of those that succeeded.
fn spawn_creates(h: &Harness, set: &mut JoinSet<Vec<String>>, post: String, author: String) {
    let client = h.client.clone();
    set.spawn(async move {
        let mut created = Vec::new();
        let mut calls = JoinSet::new();
        for n in 0..CREATES {
            let mut client = client.clone();
            let req = as_user(&author, "USER", create(&post, n));
            calls.spawn(async move { client.create_comment(req).await });
        }
        while let Some(result) = calls.join_next().await {
            match result.unwrap() {
                Ok(ok) => created.push(ok.into_inner().comment.unwrap().comment_id),
                // Refused after the cascade: NOT_FOUND (post) or the user-gone code.
                Err(status) => assert!(
                    matches!(
                        status.code(),
                        Code::NotFound
                            | Code::FailedPrecondition
                            | Code::PermissionDenied
                            | Code::Unauthenticated
                    ),
                    "{status:?}"
                ),
            }
        }
        created
    });
}

/// What is left: comments still stored (must be none) and the outbox's deletions.
async fn check(h: &Harness, created: &BTreeSet<String>) {
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM comments")
        .fetch_one(h.comments.db().pool())
        .await
        .unwrap();
    assert_eq!(
        left, 0,
        "{}: orphan comments survived their cascade",
        h.name
    );
    let deleted: BTreeSet<String> = deleted_ids(&outbox(&h.comments).await)
        .into_iter()
        .collect();
    assert_eq!(
        &deleted, created,
        "{}: every comment that was created was deleted by the cascade, once",
        h.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_racing_a_post_deletion_leaves_no_orphan() {
    for h in harnesses("comments_race_post").await {
        let started = Instant::now();
        let posts: Vec<String> = (0..POSTS).map(|i| format!("race-p{i}")).collect();
        for p in &posts {
            h.posts.add(p, "alice");
        }
        let (stop, shutdown) = watch::channel(false);
        let consumer = tokio::spawn(follow_post_events(
            h.comments.clone(),
            h.posts_channel.clone(),
            shutdown,
        ));
        eventually!(h.posts.log.connections() >= 1, "the consumer connected");
        // One post at a time: its creates and its deletion start together.
        let mut created = BTreeSet::new();
        for (i, p) in posts.iter().enumerate() {
            let mut creators = JoinSet::new();
            spawn_creates(&h, &mut creators, p.clone(), format!("bob{i}"));
            h.posts.log.push(PostEvent {
                sequence: i as i64 + 1,
                create_time: None,
                epoch: String::new(),
                event: Some(Event::PostDeleted(PostDeleted {
                    post_id: p.clone(),
                    author_id: "alice".into(),
                })),
            });
            while let Some(ids) = creators.join_next().await {
                created.extend(ids.unwrap());
            }
            eventually!(
                h.comments.db().cursor(POST_EVENTS_CURSOR).await.unwrap() == i as i64 + 1,
                "the PostDeleted applied"
            );
        }
        stop.send(true).unwrap();
        consumer.await.unwrap();
        println!(
            "{}: {} of {} creates won the race and were cascaded, in {:?}",
            h.name,
            created.len(),
            POSTS * CREATES,
            started.elapsed()
        );
        check(&h, &created).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_racing_a_user_deletion_leaves_no_orphan() {
    for h in harnesses("comments_race_user").await {
        let started = Instant::now();
        h.posts.add("race-post", "alice");
        let (stop, shutdown) = watch::channel(false);
        let consumer = tokio::spawn(follow_user_events(
            h.comments.clone(),
            h.users_channel.clone(),
            shutdown,
        ));
        eventually!(h.users.log.connections() >= 1, "the consumer connected");
        // One user at a time: their creates and their deletion start together.
        let mut created = BTreeSet::new();
        for i in 0..POSTS {
            let user = format!("race-u{i}");
            let mut creators = JoinSet::new();
            spawn_creates(&h, &mut creators, "race-post".into(), user.clone());
            h.users.log.push(UserEvent {
                sequence: i as i64 + 1,
                create_time: None,
                epoch: String::new(),
                event: Some(UserKind::UserDeleted(UserDeleted { user_id: user })),
            });
            while let Some(ids) = creators.join_next().await {
                created.extend(ids.unwrap());
            }
            eventually!(
                h.comments.db().cursor(USER_EVENTS_CURSOR).await.unwrap() == i as i64 + 1,
                "the UserDeleted applied"
            );
        }
        stop.send(true).unwrap();
        consumer.await.unwrap();
        println!(
            "{}: {} of {} creates won the race and were cascaded, in {:?}",
            h.name,
            created.len(),
            POSTS * CREATES,
            started.elapsed()
        );
        check(&h, &created).await;
    }
}
