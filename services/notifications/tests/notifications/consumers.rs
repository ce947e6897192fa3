//! Notifications come from comment events, exactly once; deletions clean up.

use tessera_notifications::{COMMENT_EVENTS_CURSOR, USER_EVENTS_CURSOR};

use crate::support::{eventually, harnesses, harnesses_with};

#[tokio::test]
async fn a_comment_notifies_the_post_author_but_not_themself() {
    for mut h in harnesses("notif_created").await {
        h.start();
        h.comment("c1", "p1", "bob", "alice");
        h.comment("c2", "p1", "alice", "alice"); // on her own post: nothing
        let last = h.comment("c3", "p1", "carol", "alice");
        h.caught_up(COMMENT_EVENTS_CURSOR, last).await;

        let alice = h.all("alice").await;
        let got: Vec<_> = alice
            .iter()
            .map(|n| {
                (
                    n.comment_id.as_str(),
                    n.actor_id.as_str(),
                    n.post_id.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [("c3", "carol", "p1"), ("c1", "bob", "p1")],
            "{}",
            h.name
        );
        assert!(alice.iter().all(|n| !n.read && n.create_time.is_some()));
        assert!(h.all("bob").await.is_empty());
        assert!(h.all("carol").await.is_empty());
        h.stop().await;
    }
}

#[tokio::test]
async fn replayed_events_notify_once() {
    // The fake upstream ignores the cursor, replays everything on each connection and ends
    // the stream, so the consumer sees every event again and again.
    for mut h in harnesses_with("notif_replay", true).await {
        h.comment("c1", "p1", "bob", "alice");
        let last = h.comment("c2", "p2", "carol", "alice");
        h.start();
        h.caught_up(COMMENT_EVENTS_CURSOR, last).await;
        let comments = h.comments.clone();
        eventually!(comments.connections() >= 3, "several replays");
        assert_eq!(h.all("alice").await.len(), 2, "{}", h.name);
        // One delivery record per notification, too.
        let deliveries = h.service.db().read_events(0, 1000).await.unwrap();
        assert_eq!(deliveries.len(), 2, "{}", h.name);
        h.stop().await;
    }
}

#[tokio::test]
async fn consumers_resume_from_their_cursor_after_a_restart() {
    for mut h in harnesses("notif_restart").await {
        h.start();
        let first = h.comment("c1", "p1", "bob", "alice");
        h.caught_up(COMMENT_EVENTS_CURSOR, first).await;
        h.stop().await;
        let second = h.comment("c2", "p1", "bob", "alice");
        h.start();
        h.caught_up(COMMENT_EVENTS_CURSOR, second).await;
        let ids = h.comment_ids("alice").await;
        assert_eq!(ids, ["c2", "c1"], "{}", h.name);
        h.stop().await;
    }
}

#[tokio::test]
async fn deleted_comments_take_their_notification() {
    for mut h in harnesses("notif_comment_deleted").await {
        h.start();
        h.comment("c1", "p1", "bob", "alice");
        h.comment("c2", "p1", "carol", "alice");
        let last = h.delete_comment("c1", "p1");
        h.caught_up(COMMENT_EVENTS_CURSOR, last).await;
        let ids = h.comment_ids("alice").await;
        assert_eq!(ids, ["c2"], "{}", h.name);
        h.stop().await;
    }
}

#[tokio::test]
async fn a_backlog_applies_in_order_within_one_batch() {
    // All there before the consumer starts, so they arrive as one batch: the runs of
    // CommentCreated are inserted together, the deletion between them in its place.
    for mut h in harnesses("notif_backlog").await {
        h.comment("c1", "p1", "bob", "alice");
        h.comment("c2", "p1", "carol", "alice");
        h.comment("c3", "p1", "alice", "alice"); // her own: nothing
        h.delete_comment("c1", "p1");
        h.comment("c4", "p2", "bob", "alice");
        let last = h.comment("c5", "p2", "dave", "erin");
        h.start();
        h.caught_up(COMMENT_EVENTS_CURSOR, last).await;
        assert_eq!(h.comment_ids("alice").await, ["c4", "c2"], "{}", h.name);
        assert_eq!(h.comment_ids("erin").await, ["c5"], "{}", h.name);
        // One delivery per notification made (c1's included: it was made, then removed).
        let deliveries = h.service.db().read_events(0, 1000).await.unwrap();
        assert_eq!(deliveries.len(), 4, "{}", h.name);
        h.stop().await;
    }
}

#[tokio::test]
async fn deleted_users_lose_their_notifications() {
    for mut h in harnesses("notif_user_deleted").await {
        h.start();
        h.comment("c1", "p1", "bob", "alice");
        h.comment("c2", "p2", "alice", "dave"); // alice is the actor here
        h.comment("c3", "p3", "bob", "erin");
        let c = h.comment("c4", "p4", "bob", "dave");
        h.caught_up(COMMENT_EVENTS_CURSOR, c).await;
        assert_eq!(h.all("dave").await.len(), 2);

        let u = h.delete_user("alice");
        h.caught_up(USER_EVENTS_CURSOR, u).await;
        assert!(h.all("alice").await.is_empty(), "{}", h.name);
        let dave = h.comment_ids("dave").await;
        assert_eq!(dave, ["c4"], "{}: alice's actions are gone too", h.name);
        assert_eq!(h.all("erin").await.len(), 1);

        // A late comment on a deleted user's post notifies no one.
        let late = h.comment("c5", "p1", "bob", "alice");
        h.caught_up(COMMENT_EVENTS_CURSOR, late).await;
        assert!(h.all("alice").await.is_empty(), "{}", h.name);
        h.stop().await;
    }
}
