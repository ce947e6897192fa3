//! Catch-up throughput of the comments consumer (issue #18): a seeded backlog of
//! CommentCreated events in a real comments outbox, served by the comment service itself over
//! an in-process channel, and the notification consumer started behind it. Prints events/s;
//! asserts only that every event was applied once. Not a timing test, so ignored by default:
//!
//! ```sh
//! cargo test --release -p tessera-notifications --test notifications catch_up -- --ignored --nocapture
//! ```
//! (`CATCH_UP_EVENTS` sets the backlog, 60000 by default.)

use std::time::{Duration, Instant};

use tessera::{
    comments::v1::{
        Comment, CommentCreated, comment_service_server::CommentServiceServer,
        watch_events_response::Event as CommentKind,
    },
    posts::v1::{post_service_client::PostServiceClient, post_service_server::PostServiceServer},
};
use tessera_client::Channel;
use tessera_comments::Comments;
use tessera_notifications::{COMMENT_EVENTS_CURSOR, Notifications, follow_comment_events};
use tessera_store::{outbox, testing};
use tessera_testing::fakes::FakePosts;

tessera_store::watch_events!(CommentEvents = tessera::comments::v1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a throughput measurement; run with --ignored --nocapture"]
async fn catch_up() {
    let backlog: i64 = std::env::var("CATCH_UP_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(60_000);
    let producers = testing::databases("catchup-comments", tessera_comments::MIGRATIONS).await;
    let consumers = testing::databases("catchup-notifs", tessera_notifications::MIGRATIONS).await;
    for (producer, consumer) in producers.iter().zip(&consumers) {
        seed(&producer.db, backlog).await;
        let posts = PostServiceClient::new(Channel::from_service(PostServiceServer::new(
            FakePosts::default(),
        )));
        let comments = Comments::with_db(producer.db.clone(), posts).await.unwrap();
        let comments = Channel::from_service(CommentServiceServer::new(comments));
        let notifications = Notifications::with_db(consumer.db.clone()).await.unwrap();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let task = tokio::spawn(follow_comment_events(
            notifications.clone(),
            comments,
            shutdown,
        ));
        let deadline = started + Duration::from_secs(600);
        while notifications
            .db()
            .cursor(COMMENT_EVENTS_CURSOR)
            .await
            .unwrap()
            < backlog
        {
            assert!(
                Instant::now() < deadline,
                "{}: no catch-up in 600 s",
                producer.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = started.elapsed();
        stop.send_replace(true);
        task.await.unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM notifications")
            .fetch_one(notifications.db().pool())
            .await
            .unwrap();
        assert_eq!(
            n, backlog,
            "{}: one notification per comment",
            producer.name
        );
        println!(
            "catch-up {}: {backlog} events in {:.2} s = {:.0} events/s",
            producer.name,
            took.as_secs_f64(),
            backlog as f64 / took.as_secs_f64()
        );
    }
}

/// `n` CommentCreated events in the comments outbox, each notifying a post's author.
async fn seed(db: &tessera_store::Db, n: i64) {
    let mut next = 0;
    while next < n {
        let mut tx = db.begin().await.unwrap();
        for i in next..(next + 1000).min(n) {
            let event = CommentKind::CommentCreated(CommentCreated {
                comment: Some(Comment {
                    comment_id: format!("c{i}"),
                    post_id: format!("p{}", i / 5),
                    author_id: format!("u{}", i % 1000),
                    body: "seeded".into(),
                    create_time: None,
                }),
                post_author_id: format!("author{}", i % 997),
            });
            outbox::append::<CommentEvents>(&mut tx, event)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        next = (next + 1000).min(n);
    }
}
