//! The cascades: PostDeleted and UserDeleted remove comments exactly once.

use std::time::Duration;

use tessera::{
    comments::v1::{CreateCommentRequest, ListCommentsRequest},
    posts::v1::{
        Post, PostCreated, PostDeleted, WatchEventsResponse as PostEvent,
        watch_events_response::Event as PostKind,
    },
    users::v1::{
        UserDeleted, WatchEventsResponse as UserEvent, watch_events_response::Event as UserKind,
    },
};
use tessera_comments::{
    POST_EVENTS_CURSOR, USER_EVENTS_CURSOR, follow_post_events, follow_user_events,
};
use tokio::sync::watch;
use tonic::Code;

use crate::support::{
    Harness, as_user, deleted_ids, eventually, harnesses, harnesses_with, outbox,
};

fn hi(post: &str) -> CreateCommentRequest {
    CreateCommentRequest {
        post_id: post.into(),
        body: "hi".into(),
        request_id: String::new(),
    }
}

/// Comments on `post` as `user`; returns the comment id.
async fn comment(h: &Harness, user: &str, post: &str) -> String {
    h.comment(user, hi(post)).await.comment_id
}

/// Tries to comment on `post` as `user`, which must fail; returns why.
async fn refused(h: &Harness, user: &str, post: &str) -> Code {
    h.client
        .clone()
        .create_comment(as_user(user, "USER", hi(post)))
        .await
        .unwrap_err()
        .code()
}

async fn count(h: &Harness, post: &str) -> usize {
    h.client
        .clone()
        .list_comments(ListCommentsRequest {
            post_id: post.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .comments
        .len()
}

fn post_deleted(sequence: i64, post_id: &str) -> PostEvent {
    PostEvent {
        sequence,
        create_time: None,
        epoch: String::new(),
        event: Some(PostKind::PostDeleted(PostDeleted {
            post_id: post_id.into(),
            author_id: "alice".into(),
        })),
    }
}

fn user_deleted(sequence: i64, user_id: &str) -> UserEvent {
    UserEvent {
        sequence,
        create_time: None,
        epoch: String::new(),
        event: Some(UserKind::UserDeleted(UserDeleted {
            user_id: user_id.into(),
        })),
    }
}

/// Stops a consumer task within a bound.
async fn stop(tx: watch::Sender<bool>, task: tokio::task::JoinHandle<()>) {
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the consumer stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn deleted_posts_take_their_comments() {
    for h in harnesses("comments_post_deleted").await {
        h.posts.add("p1", "alice");
        h.posts.add("p2", "alice");
        let mut on_p1 = vec![
            comment(&h, "bob", "p1").await,
            comment(&h, "carol", "p1").await,
        ];
        comment(&h, "bob", "p2").await;

        h.posts.log.push(PostEvent {
            sequence: 1,
            create_time: None,
            epoch: String::new(),
            event: Some(PostKind::PostCreated(PostCreated {
                post: Some(Post::default()),
            })),
        });
        h.posts.log.push(post_deleted(2, "p1"));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(follow_post_events(
            h.comments.clone(),
            h.posts_channel.clone(),
            rx,
        ));
        eventually!(count(&h, "p1").await == 0, "p1's comments are deleted");
        eventually!(
            h.comments.db().cursor(POST_EVENTS_CURSOR).await.unwrap() == 2,
            "the cursor is stored"
        );
        assert_eq!(
            count(&h, "p2").await,
            1,
            "{}: other posts untouched",
            h.name
        );
        let mut deleted = deleted_ids(&outbox(&h.comments).await);
        deleted.sort();
        on_p1.sort();
        assert_eq!(deleted, on_p1, "{}: one CommentDeleted per comment", h.name);

        // The post is gone even if a stale GetPost still finds it.
        assert_eq!(refused(&h, "bob", "p1").await, Code::NotFound, "{}", h.name);
        stop(tx, task).await;
    }
}

#[tokio::test]
async fn deleted_users_take_their_comments() {
    for h in harnesses("comments_user_deleted").await {
        h.posts.add("p1", "alice");
        h.posts.add("p2", "alice");
        comment(&h, "bob", "p1").await;
        comment(&h, "bob", "p2").await;
        comment(&h, "carol", "p1").await;

        h.users.log.push(user_deleted(7, "bob"));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(follow_user_events(
            h.comments.clone(),
            h.users_channel.clone(),
            rx,
        ));
        eventually!(
            count(&h, "p1").await == 1 && count(&h, "p2").await == 0,
            "bob's comments are deleted"
        );
        eventually!(
            h.comments.db().cursor(USER_EVENTS_CURSOR).await.unwrap() == 7,
            "the cursor is stored"
        );
        assert_eq!(deleted_ids(&outbox(&h.comments).await).len(), 2);

        // A token that outlived its user cannot comment.
        assert_eq!(
            refused(&h, "bob", "p1").await,
            Code::Unauthenticated,
            "{}",
            h.name
        );
        stop(tx, task).await;
    }
}

#[tokio::test]
async fn replayed_events_take_effect_once() {
    // The fake upstream ignores the cursor and replays everything on each connection, then
    // ends the stream, so the consumer reconnects and sees every event again and again.
    for h in harnesses_with("comments_replay", true).await {
        h.posts.add("p1", "alice");
        h.posts.add("p2", "alice");
        comment(&h, "bob", "p1").await;
        h.posts.log.push(post_deleted(1, "p1"));
        h.posts.log.push(post_deleted(2, "p2"));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(follow_post_events(
            h.comments.clone(),
            h.posts_channel.clone(),
            rx,
        ));
        eventually!(
            h.comments.db().cursor(POST_EVENTS_CURSOR).await.unwrap() == 2,
            "the cursor reaches the end"
        );
        // A comment on p2 made after its PostDeleted was applied is refused (tombstone) ...
        assert_eq!(refused(&h, "bob", "p2").await, Code::NotFound);
        // ... and replays after that change nothing.
        eventually!(h.posts.log.connections() >= 3, "several replays");
        assert_eq!(
            deleted_ids(&outbox(&h.comments).await).len(),
            1,
            "{}",
            h.name
        );
        stop(tx, task).await;
    }
}

#[tokio::test]
async fn consumers_stop_on_shutdown_even_while_connected() {
    for h in harnesses("comments_stop").await {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(follow_post_events(
            h.comments.clone(),
            h.posts_channel.clone(),
            rx,
        ));
        eventually!(h.posts.log.connections() >= 1, "connected");
        stop(tx, task).await;
    }
}
