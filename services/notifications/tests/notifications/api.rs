//! ListNotifications and MarkNotificationsRead: paging, filters, ownership, bad input.

use tessera::notifications::v1::{ListNotificationsRequest, MarkNotificationsReadRequest};
use tessera_mesh::errors::violated_fields;
use tessera_notifications::COMMENT_EVENTS_CURSOR;
use tonic::{Code, Request};

use crate::support::{Harness, as_user, harnesses};

fn list(page_size: i32, page_token: &str, unread_only: bool) -> ListNotificationsRequest {
    ListNotificationsRequest {
        page_size,
        page_token: page_token.into(),
        unread_only,
    }
}

fn mark(ids: &[&str]) -> MarkNotificationsReadRequest {
    MarkNotificationsReadRequest {
        notification_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// Five notifications for alice (c0..c4, oldest first) and one for bob.
async fn seeded(h: &mut Harness) {
    h.start();
    for i in 0..5 {
        h.comment(&format!("c{i}"), "p1", "carol", "alice");
    }
    let last = h.comment("b0", "p9", "carol", "bob");
    h.caught_up(COMMENT_EVENTS_CURSOR, last).await;
}

#[tokio::test]
async fn pages_newest_first_with_unread_filter() {
    for mut h in harnesses("notif_pages").await {
        seeded(&mut h).await;
        let mut c = h.client.clone();

        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = c
                .list_notifications(as_user("alice", "USER", list(2, &token, false)))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(page.unread_count, 5);
            assert!(page.notifications.len() <= 2);
            seen.extend(page.notifications.into_iter().map(|n| n.comment_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, ["c4", "c3", "c2", "c1", "c0"], "{}", h.name);

        // Mark two read: the unread filter and count follow.
        let all = h.all("alice").await;
        let ids: Vec<&str> = all
            .iter()
            .filter(|n| n.comment_id == "c4" || n.comment_id == "c1")
            .map(|n| n.notification_id.as_str())
            .collect();
        let left = c
            .mark_notifications_read(as_user("alice", "USER", mark(&ids)))
            .await
            .unwrap()
            .into_inner()
            .unread_count;
        assert_eq!(left, 3, "{}", h.name);
        let unread = c
            .list_notifications(as_user("alice", "USER", list(0, "", true)))
            .await
            .unwrap()
            .into_inner();
        let unread_ids: Vec<_> = unread
            .notifications
            .iter()
            .map(|n| n.comment_id.as_str())
            .collect();
        assert_eq!(unread_ids, ["c3", "c2", "c0"], "{}", h.name);
        assert_eq!(unread.unread_count, 3);
        let read: Vec<_> = h
            .all("alice")
            .await
            .into_iter()
            .filter(|n| n.read)
            .map(|n| n.comment_id)
            .collect();
        assert_eq!(read, ["c4", "c1"]);

        // Paging within the unread filter.
        let first = c
            .list_notifications(as_user("alice", "USER", list(2, "", true)))
            .await
            .unwrap()
            .into_inner();
        let second = c
            .list_notifications(as_user(
                "alice",
                "USER",
                list(2, &first.next_page_token, true),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(second.notifications.len(), 1);
        assert_eq!(second.notifications[0].comment_id, "c0");
        assert!(second.next_page_token.is_empty());

        // Bob's list is his own.
        let bob = h.all("bob").await;
        assert_eq!(bob.len(), 1);
        assert_eq!(bob[0].comment_id, "b0");

        // Empty list: all of the caller's, nobody else's.
        let left = c
            .mark_notifications_read(as_user("alice", "USER", mark(&[])))
            .await
            .unwrap()
            .into_inner()
            .unread_count;
        assert_eq!(left, 0);
        assert!(!h.all("bob").await[0].read, "{}", h.name);
        h.stop().await;
    }
}

#[tokio::test]
async fn bad_list_requests() {
    for mut h in harnesses("notif_bad_list").await {
        seeded(&mut h).await;
        let mut c = h.client.clone();
        let token = c
            .list_notifications(as_user("alice", "USER", list(1, "", false)))
            .await
            .unwrap()
            .into_inner()
            .next_page_token;
        assert!(!token.is_empty());
        let cases = [
            (
                "negative size",
                "alice",
                list(-1, "", false),
                vec!["page_size"],
            ),
            (
                "garbage token",
                "alice",
                list(0, "garbage!", false),
                vec!["page_token"],
            ),
            (
                "base64 garbage",
                "alice",
                list(0, "AAAA", false),
                vec!["page_token"],
            ),
            (
                "someone else's token",
                "bob",
                list(0, &token, false),
                vec!["page_token"],
            ),
            (
                "other filter's token",
                "alice",
                list(0, &token, true),
                vec!["page_token"],
            ),
        ];
        for (name, user, req, fields) in cases {
            let err = c
                .list_notifications(as_user(user, "USER", req))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{}: {name}", h.name);
            assert_eq!(violated_fields(&err), fields, "{}: {name}", h.name);
        }
        let err = c
            .list_notifications(Request::new(list(0, "", false)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        h.stop().await;
    }
}

#[tokio::test]
async fn only_your_own_notifications_can_be_marked() {
    for mut h in harnesses("notif_mark").await {
        seeded(&mut h).await;
        let mut c = h.client.clone();
        let alice = h.all("alice").await;
        let bob = h.all("bob").await;
        let mine = alice[0].notification_id.as_str();
        let theirs = bob[0].notification_id.as_str();
        let too_many: Vec<String> = (0..1001).map(|i| format!("n{i}")).collect();
        let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
        let long = "x".repeat(200);

        let cases: Vec<(&str, Vec<&str>, Code, Vec<&str>)> = vec![
            (
                "someone else's",
                vec![mine, theirs],
                Code::PermissionDenied,
                vec![],
            ),
            ("unknown", vec![mine, "nope"], Code::NotFound, vec![]),
            (
                "empty id",
                vec![mine, ""],
                Code::InvalidArgument,
                vec!["notification_ids"],
            ),
            (
                "long id",
                vec![long.as_str()],
                Code::InvalidArgument,
                vec!["notification_ids"],
            ),
            (
                "too many",
                too_many,
                Code::InvalidArgument,
                vec!["notification_ids"],
            ),
        ];
        for (name, ids, code, fields) in cases {
            let err = c
                .mark_notifications_read(as_user("alice", "USER", mark(&ids)))
                .await
                .unwrap_err();
            assert_eq!(err.code(), code, "{}: {name}", h.name);
            assert_eq!(violated_fields(&err), fields, "{}: {name}", h.name);
        }
        // Nothing changed: a failed request marks nothing.
        assert!(h.all("alice").await.iter().all(|n| !n.read), "{}", h.name);
        assert!(h.all("bob").await.iter().all(|n| !n.read));

        // Duplicates are fine.
        let left = c
            .mark_notifications_read(as_user("alice", "USER", mark(&[mine, mine])))
            .await
            .unwrap()
            .into_inner()
            .unread_count;
        assert_eq!(left, 4);
        // Marking again is idempotent.
        let again = c
            .mark_notifications_read(as_user("alice", "USER", mark(&[mine])))
            .await
            .unwrap()
            .into_inner()
            .unread_count;
        assert_eq!(again, 4);
        let err = c
            .mark_notifications_read(Request::new(mark(&[])))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        h.stop().await;
    }
}
