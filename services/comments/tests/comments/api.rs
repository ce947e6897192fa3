//! CommentService behaviour: create, list, delete, watch, and bad input.

use std::time::Duration;

use futures::StreamExt;
use tessera::comments::v1::{
    CreateCommentRequest, DeleteCommentRequest, ListCommentsRequest, WatchEventsRequest,
    watch_events_response::Event,
};
use tessera_comments::MAX_BODY_CHARS;
use tessera_mesh::errors::violated_fields;
use tonic::{Code, Request};

use crate::support::{as_user, deleted_ids, harnesses, outbox};

fn create(post_id: &str, body: &str, request_id: &str) -> CreateCommentRequest {
    CreateCommentRequest {
        post_id: post_id.into(),
        body: body.into(),
        request_id: request_id.into(),
    }
}

fn list(post_id: &str, page_size: i32, page_token: &str) -> ListCommentsRequest {
    ListCommentsRequest {
        post_id: post_id.into(),
        page_size,
        page_token: page_token.into(),
    }
}

#[tokio::test]
async fn comments_list_oldest_first_in_pages() {
    for h in harnesses("comments_pages").await {
        let mut c = h.client.clone();
        h.posts.add("p1", "alice");
        h.posts.add("p2", "alice");
        let mut ids = Vec::new();
        for i in 0..5 {
            let reply = h.comment("bob", create("p1", &format!("c{i}"), "")).await;
            assert_eq!(reply.author_id, "bob");
            assert_eq!(reply.post_id, "p1");
            assert!(reply.create_time.is_some());
            ids.push(reply.comment_id);
        }
        c.create_comment(as_user("bob", "USER", create("p2", "elsewhere", "")))
            .await
            .unwrap();

        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = c
                .list_comments(list("p1", 2, &token))
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            assert!(page.comments.len() <= 2);
            seen.extend(page.comments.into_iter().map(|c| c.comment_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, ids, "{}: every comment once, oldest first", h.name);
        assert_eq!(pages, 3, "{}", h.name);

        // Default page size and the cap.
        let all = c
            .list_comments(list("p1", 0, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.comments.len(), 5);
        assert!(all.next_page_token.is_empty());
        let none = c
            .list_comments(list("nope", 0, ""))
            .await
            .unwrap()
            .into_inner();
        assert!(none.comments.is_empty());
    }
}

#[tokio::test]
async fn page_size_is_capped_at_100() {
    for h in harnesses("comments_cap").await {
        let mut c = h.client.clone();
        h.posts.add("p1", "alice");
        for i in 0..101 {
            c.create_comment(as_user("bob", "USER", create("p1", &format!("{i}"), "")))
                .await
                .unwrap();
        }
        let page = c
            .list_comments(list("p1", 1000, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.comments.len(), 100, "{}", h.name);
        let rest = c
            .list_comments(list("p1", 1000, &page.next_page_token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rest.comments.len(), 1);
        assert!(rest.next_page_token.is_empty());
    }
}

#[tokio::test]
async fn request_id_makes_create_idempotent_per_author() {
    for h in harnesses("comments_idem").await {
        let mut c = h.client.clone();
        h.posts.add("p1", "alice");
        let first = h.comment("bob", create("p1", "hi", "r1")).await;
        let again = h.comment("bob", create("p1", "hi", "r1")).await;
        assert_eq!(first, again, "{}", h.name);
        // Another author's request ids are their own.
        let carol = h.comment("carol", create("p1", "hi", "r1")).await;
        assert_ne!(carol.comment_id, first.comment_id);
        // Concurrent retries still create one comment.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.create_comment(as_user("dave", "USER", create("p1", "race", "r2")))
                    .await
                    .map(|r| r.into_inner().comment.unwrap().comment_id)
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap().unwrap());
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "{}: {ids:?}", h.name);

        let page = c
            .list_comments(list("p1", 0, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.comments.len(), 3);
        let created = outbox(&h.comments)
            .await
            .iter()
            .filter(|e| matches!(e.event, Some(Event::CommentCreated(_))))
            .count();
        assert_eq!(created, 3, "one event per comment");
    }
}

#[tokio::test]
async fn bad_create_requests() {
    let long = "x".repeat(MAX_BODY_CHARS + 1);
    let cases: Vec<(&str, CreateCommentRequest, Code, Vec<&str>)> = vec![
        (
            "no post",
            create("", "hi", ""),
            Code::InvalidArgument,
            vec!["post_id"],
        ),
        (
            "empty body",
            create("p1", "", ""),
            Code::InvalidArgument,
            vec!["body"],
        ),
        (
            "blank body",
            create("p1", " \n\t", ""),
            Code::InvalidArgument,
            vec!["body"],
        ),
        (
            "long body",
            create("p1", &long, ""),
            Code::InvalidArgument,
            vec!["body"],
        ),
        (
            "NUL in body",
            create("p1", "a\0b", ""),
            Code::InvalidArgument,
            vec!["body"],
        ),
        (
            "long request id",
            create("p1", "hi", &"r".repeat(200)),
            Code::InvalidArgument,
            vec!["request_id"],
        ),
        (
            "several",
            create("p\u{0}", "", ""),
            Code::InvalidArgument,
            vec!["post_id", "body"],
        ),
        (
            "missing post",
            create("nope", "hi", ""),
            Code::NotFound,
            vec![],
        ),
    ];
    for h in harnesses("comments_bad_create").await {
        h.posts.add("p1", "alice");
        for (name, req, code, fields) in &cases {
            let err = h
                .client
                .clone()
                .create_comment(as_user("bob", "USER", req.clone()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), *code, "{}: {name}: {err:?}", h.name);
            assert_eq!(violated_fields(&err), *fields, "{}: {name}", h.name);
        }
        // Without a verified user.
        let err = h
            .client
            .clone()
            .create_comment(Request::new(create("p1", "hi", "")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        // The longest body, in multi-byte characters, is fine.
        let max = "é".repeat(MAX_BODY_CHARS);
        let ok = h
            .client
            .clone()
            .create_comment(as_user("bob", "USER", create("p1", &max, "")))
            .await
            .unwrap();
        assert_eq!(ok.into_inner().comment.unwrap().body, max);
        // Posts failing is not NOT_FOUND.
        *h.posts.fail.lock().unwrap() = Some(Code::Unavailable);
        let err = h
            .client
            .clone()
            .create_comment(as_user("bob", "USER", create("p1", "hi", "")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }
}

#[tokio::test]
async fn bad_list_requests() {
    for h in harnesses("comments_bad_list").await {
        let mut c = h.client.clone();
        h.posts.add("p1", "alice");
        h.posts.add("p2", "alice");
        for _ in 0..3 {
            c.create_comment(as_user("bob", "USER", create("p1", "x", "")))
                .await
                .unwrap();
            c.create_comment(as_user("bob", "USER", create("p2", "x", "")))
                .await
                .unwrap();
        }
        let p1_token = c
            .list_comments(list("p1", 1, ""))
            .await
            .unwrap()
            .into_inner()
            .next_page_token;
        assert!(!p1_token.is_empty());
        let cases = [
            ("no post", list("", 0, ""), vec!["post_id"]),
            ("negative size", list("p1", -1, ""), vec!["page_size"]),
            (
                "garbage token",
                list("p1", 0, "garbage!"),
                vec!["page_token"],
            ),
            ("base64 garbage", list("p1", 0, "AAAA"), vec!["page_token"]),
            (
                "other post's token",
                list("p2", 0, &p1_token),
                vec!["page_token"],
            ),
        ];
        for (name, req, fields) in cases {
            let err = c.list_comments(req).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{}: {name}", h.name);
            assert_eq!(violated_fields(&err), fields, "{}: {name}", h.name);
        }
    }
}

#[tokio::test]
async fn who_may_delete_a_comment() {
    // (caller, role, expected)
    let cases = [
        ("bob", "USER", Code::Ok),      // the comment's author
        ("alice", "USER", Code::Ok),    // the post's author
        ("mod", "MODERATOR", Code::Ok), // a moderator
        ("root", "ADMIN", Code::Ok),    // an admin
        ("eve", "USER", Code::PermissionDenied),
        // The token says MODERATOR, the stored role no longer does: refused at once.
        ("stale", "MODERATOR", Code::PermissionDenied),
        ("gone", "ADMIN", Code::PermissionDenied),
    ];
    for h in harnesses("comments_delete").await {
        let mut c = h.client.clone();
        h.posts.add("p1", "alice");
        for (caller, role, expected) in cases {
            let comment = h.comment("bob", create("p1", "hi", "")).await;
            let got = c
                .delete_comment(as_user(
                    caller,
                    role,
                    DeleteCommentRequest {
                        comment_id: comment.comment_id.clone(),
                    },
                ))
                .await
                .map(|_| ())
                .map_err(|e| e.code())
                .err()
                .unwrap_or(Code::Ok);
            assert_eq!(got, expected, "{}: {caller} ({role})", h.name);
            let listed = c
                .list_comments(list("p1", 100, ""))
                .await
                .unwrap()
                .into_inner()
                .comments
                .iter()
                .any(|x| x.comment_id == comment.comment_id);
            assert_eq!(listed, expected != Code::Ok, "{}: {caller}", h.name);
            if expected == Code::Ok {
                // Deleting again: it is gone.
                let err = c
                    .delete_comment(as_user(
                        "bob",
                        "USER",
                        DeleteCommentRequest {
                            comment_id: comment.comment_id.clone(),
                        },
                    ))
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), Code::NotFound);
            }
        }
        let deleted = deleted_ids(&outbox(&h.comments).await);
        assert_eq!(
            deleted.len(),
            4,
            "{}: one CommentDeleted per deletion",
            h.name
        );

        let err = c
            .delete_comment(as_user("bob", "USER", DeleteCommentRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&err), ["comment_id"]);
        let err = c
            .delete_comment(Request::new(DeleteCommentRequest {
                comment_id: "x".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn watch_events_replays_then_follows() {
    for h in harnesses("comments_watch").await {
        let mut c = h.client.clone();
        h.posts.add("p1", "alice");
        let a = h.comment("bob", create("p1", "a", "")).await;
        c.delete_comment(as_user(
            "bob",
            "USER",
            DeleteCommentRequest {
                comment_id: a.comment_id.clone(),
            },
        ))
        .await
        .unwrap();

        let mut stream = c
            .watch_events(WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        match first.event {
            Some(Event::CommentCreated(e)) => {
                assert_eq!(e.comment.unwrap(), a);
                assert_eq!(e.post_author_id, "alice");
            }
            other => panic!("{}: unexpected {other:?}", h.name),
        }
        assert!(first.create_time.is_some());
        let second = stream.next().await.unwrap().unwrap();
        assert!(second.sequence > first.sequence);
        match second.event {
            Some(Event::CommentDeleted(e)) => {
                assert_eq!(e.comment_id, a.comment_id);
                assert_eq!(e.post_id, "p1");
            }
            other => panic!("{}: unexpected {other:?}", h.name),
        }
        // Live: a new comment arrives on the open stream.
        let b = h.comment("bob", create("p1", "b", "")).await;
        let third = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(&third.event, Some(Event::CommentCreated(e)) if e.comment.as_ref() == Some(&b))
        );

        // Resuming after a sequence skips what came before.
        let mut resumed = c
            .watch_events(WatchEventsRequest {
                after_sequence: second.sequence,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let next = resumed.next().await.unwrap().unwrap();
        assert_eq!(next.sequence, third.sequence);

        let err = c
            .watch_events(WatchEventsRequest {
                after_sequence: -1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&err), ["after_sequence"]);

        // Deletions only: the creation before the deletion is passed over (the deletion's
        // sequence moves a cursor past it), the one after comes as a progress marker.
        let mut deletions = c
            .watch_events(WatchEventsRequest {
                after_sequence: 0,
                event_fields: vec![4],
            })
            .await
            .unwrap()
            .into_inner();
        let deleted = deletions.next().await.unwrap().unwrap();
        assert_eq!(deleted.sequence, second.sequence);
        assert!(matches!(deleted.event, Some(Event::CommentDeleted(_))));
        let marker = tokio::time::timeout(tessera_testing::BOUND, deletions.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((marker.sequence, marker.event), (third.sequence, None));
        let err = c
            .watch_events(WatchEventsRequest {
                after_sequence: 0,
                event_fields: vec![3, 5],
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["event_fields[1]"]);
    }
}
