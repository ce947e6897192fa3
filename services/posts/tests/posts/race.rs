//! CreatePost racing with the UserDeleted cascade. On PostgreSQL (READ COMMITTED) a create
//! that checked the author's tombstone before the cascade wrote it, and committed after the
//! cascade's DELETE took its snapshot, would leave a post of a deleted user behind; the key
//! lock makes the two wait for each other instead. SQLite serializes writers; the test runs
//! on both.

use std::{collections::BTreeSet, sync::Arc, time::Instant};

use tessera::{
    posts::v1::{CreatePostRequest, post_service_server::PostService, watch_events_response},
    users::v1::{
        UserDeleted, WatchEventsResponse as UserEvent, user_service_server::UserServiceServer,
        watch_events_response::Event,
    },
};
use tessera_posts::{MIGRATIONS, Posts, USER_EVENTS_CURSOR};
use tessera_store::testing;
use tessera_testing::{
    as_user, eventually,
    fakes::{EventLog, FakeUsers},
};
use tokio::{sync::watch, task::JoinSet};
use tonic::Code;

/// Users deleted while they are posting.
const USERS: usize = 40;
/// Concurrent creates per user.
const CREATES: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_racing_a_user_deletion_leaves_no_orphan() {
    for t in testing::databases("posts_race_user", MIGRATIONS).await {
        let started = Instant::now();
        let posts = Posts::with_db(t.db.clone()).await.unwrap();
        let users = Arc::new(FakeUsers {
            log: EventLog::new(false),
            ..FakeUsers::default()
        });
        let client =
            tessera_client::Channel::from_service(UserServiceServer::from_arc(users.clone()));
        let (stop, shutdown) = watch::channel(false);
        let consumer = tokio::spawn(tessera_posts::follow_user_events(
            posts.clone(),
            client,
            shutdown,
        ));
        eventually!(users.log.connections() >= 1, "the consumer connected");

        // One user at a time: their creates and their deletion start together.
        let mut created = BTreeSet::new();
        for i in 0..USERS {
            let user = format!("race-u{i}");
            let mut creates = JoinSet::new();
            for n in 0..CREATES {
                let posts = posts.clone();
                let req = as_user(
                    &user,
                    "USER",
                    CreatePostRequest {
                        title: format!("racing {n}"),
                        body: "b".into(),
                        tags: vec![],
                        request_id: String::new(),
                    },
                );
                creates.spawn(async move { posts.create_post(req).await });
            }
            users.log.push(UserEvent {
                sequence: i as i64 + 1,
                create_time: None,
                epoch: String::new(),
                event: Some(Event::UserDeleted(UserDeleted {
                    user_id: user.clone(),
                })),
            });
            while let Some(result) = creates.join_next().await {
                match result.unwrap() {
                    Ok(ok) => {
                        created.insert(ok.into_inner().post.unwrap().post_id);
                    }
                    Err(status) => {
                        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}")
                    }
                }
            }
            eventually!(
                t.db.cursor(USER_EVENTS_CURSOR).await.unwrap() == i as i64 + 1,
                "the UserDeleted applied"
            );
        }
        stop.send(true).unwrap();
        consumer.await.unwrap();
        println!(
            "{}: {} of {} creates won the race and were cascaded, in {:?}",
            t.name,
            created.len(),
            USERS * CREATES,
            started.elapsed()
        );

        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM posts")
            .fetch_one(t.db.pool())
            .await
            .unwrap();
        assert_eq!(left, 0, "{}: posts of deleted users survived", t.name);
        let deleted: BTreeSet<String> =
            t.db.read_events(0, 100_000)
                .await
                .unwrap()
                .iter()
                .filter_map(|e| {
                    use prost::Message;
                    let msg = tessera::posts::v1::WatchEventsResponse::decode(e.payload.as_slice())
                        .ok()?;
                    match msg.event? {
                        watch_events_response::Event::PostDeleted(d) => Some(d.post_id),
                        _ => None,
                    }
                })
                .collect();
        assert_eq!(
            deleted, created,
            "{}: every post created was deleted by the cascade, and announced",
            t.name
        );
    }
}
