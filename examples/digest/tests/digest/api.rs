//! DigestService against fake upstreams, on SQLite (and PostgreSQL when
//! `TESSERA_TEST_DATABASE_URL` is set): validation, the consumer of posts' events, and the
//! calls to PostService and NotificationService.

use std::sync::{Arc, Mutex};

use tessera::{
    notifications::v1::{
        ListNotificationsRequest, ListNotificationsResponse, MarkNotificationsReadRequest,
        MarkNotificationsReadResponse, SubscribeNotificationsRequest,
        SubscribeNotificationsResponse,
        notification_service_client::NotificationServiceClient,
        notification_service_server::{NotificationService, NotificationServiceServer},
    },
    posts::v1::{
        Post, PostCreated, PostDeleted, WatchEventsResponse,
        post_service_client::PostServiceClient, post_service_server::PostServiceServer,
        watch_events_response::Event,
    },
};
use tessera_client::Channel;
use tessera_example_digest::{
    Digest, MIGRATIONS, follow_post_events,
    v1::{FollowAuthorRequest, GetDigestRequest, digest_service_server::DigestService},
};
use tessera_mesh::errors::violated_fields;
use tessera_store::testing::{self, TestDb};
use tessera_testing::{
    as_user, eventually,
    fakes::{BoxStream, FakePosts, not_faked},
};
use tonic::{Code, Request, Response, Status};

/// NotificationService: ListNotifications answers `unread` as the unread count and records the
/// requests it got.
#[derive(Default)]
struct FakeNotifications {
    unread: i64,
    requests: Mutex<Vec<ListNotificationsRequest>>,
}

#[tonic::async_trait]
impl NotificationService for FakeNotifications {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ListNotificationsResponse {
            unread_count: self.unread,
            ..Default::default()
        }))
    }

    async fn mark_notifications_read(
        &self,
        _: Request<MarkNotificationsReadRequest>,
    ) -> Result<Response<MarkNotificationsReadResponse>, Status> {
        not_faked()
    }

    type SubscribeNotificationsStream = BoxStream<SubscribeNotificationsResponse>;

    async fn subscribe_notifications(
        &self,
        _: Request<SubscribeNotificationsRequest>,
    ) -> Result<Response<Self::SubscribeNotificationsStream>, Status> {
        not_faked()
    }
}

struct Fixture {
    digest: Digest,
    posts: Arc<FakePosts>,
    notifications: Arc<FakeNotifications>,
    name: &'static str,
}

async fn fixtures(label: &str, unread: i64) -> (Vec<Fixture>, Vec<TestDb>) {
    let dbs = testing::databases(label, MIGRATIONS).await;
    let mut out = Vec::new();
    for t in &dbs {
        let posts = Arc::new(FakePosts::default());
        let notifications = Arc::new(FakeNotifications {
            unread,
            ..Default::default()
        });
        let digest = Digest::with_db(
            t.db.clone(),
            posts_client(&posts),
            NotificationServiceClient::new(Channel::from_service(
                NotificationServiceServer::from_arc(notifications.clone()),
            )),
        )
        .await
        .unwrap();
        out.push(Fixture {
            digest,
            posts,
            notifications,
            name: t.name,
        });
    }
    (out, dbs)
}

fn posts_client(posts: &Arc<FakePosts>) -> PostServiceClient<Channel> {
    PostServiceClient::new(Channel::from_service(PostServiceServer::from_arc(
        posts.clone(),
    )))
}

fn assert_violation(result: Result<impl std::fmt::Debug, Status>, field: &str, db: &str) {
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{db}: {err:?}");
    assert_eq!(
        violated_fields(&err),
        vec![field.to_owned()],
        "{db}: {err:?}"
    );
}

fn created(sequence: i64, post_id: &str, author_id: &str, seconds: i64) -> WatchEventsResponse {
    WatchEventsResponse {
        sequence,
        epoch: "e1".into(),
        event: Some(Event::PostCreated(PostCreated {
            post: Some(Post {
                post_id: post_id.into(),
                author_id: author_id.into(),
                create_time: Some(tessera_store::timestamp(seconds * 1_000_000)),
                ..Default::default()
            }),
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let (fixtures, _dbs) = fixtures("digest_bad_input", 0).await;
    for f in &fixtures {
        let follow = |author_id: &str| {
            as_user(
                "alice",
                "USER",
                FollowAuthorRequest {
                    author_id: author_id.into(),
                },
            )
        };
        assert_violation(
            f.digest.follow_author(follow("")).await,
            "author_id",
            f.name,
        );
        assert_violation(
            f.digest.follow_author(follow(&"x".repeat(129))).await,
            "author_id",
            f.name,
        );
        assert_violation(
            f.digest.follow_author(follow("alice")).await,
            "author_id",
            f.name,
        );
        for page_size in [-1, 101] {
            let req = as_user("alice", "USER", GetDigestRequest { page_size });
            assert_violation(f.digest.get_digest(req).await, "page_size", f.name);
        }
        // Without the end user the server stack verified, nothing is read or written.
        let anonymous = f
            .digest
            .get_digest(Request::new(GetDigestRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(anonymous.code(), Code::Unauthenticated, "{}", f.name);
        assert!(f.notifications.requests.lock().unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_digest_lists_followed_authors_posts_from_the_event_stream() {
    let (fixtures, _dbs) = fixtures("digest_events", 3).await;
    for f in &fixtures {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let consumer = tokio::spawn(follow_post_events(
            f.digest.clone(),
            Channel::from_service(PostServiceServer::from_arc(f.posts.clone())),
            shutdown,
        ));
        for (post_id, author) in [("p1", "bob"), ("p2", "carol"), ("p3", "bob"), ("p4", "bob")] {
            f.posts.add(post_id, author);
        }
        f.posts.log.push(created(1, "p1", "bob", 100));
        f.posts.log.push(created(2, "p2", "carol", 200));
        f.posts.log.push(created(3, "p3", "bob", 300));
        // Removed from PostService before its PostDeleted arrives: GetPost leaves it out.
        f.posts.log.push(created(4, "p4", "bob", 400));
        f.posts.posts.lock().unwrap().remove("p4");
        f.digest
            .follow_author(as_user(
                "alice",
                "USER",
                FollowAuthorRequest {
                    author_id: "bob".into(),
                },
            ))
            .await
            .unwrap();
        let ids = |digest: Digest| async move {
            let res = digest
                .get_digest(as_user("alice", "USER", GetDigestRequest::default()))
                .await
                .unwrap()
                .into_inner();
            (
                res.posts.into_iter().map(|p| p.post_id).collect::<Vec<_>>(),
                res.unread_notifications,
            )
        };
        eventually!(
            ids(f.digest.clone()).await.0 == ["p3", "p1"],
            "bob's posts reach the digest, newest first"
        );
        assert_eq!(ids(f.digest.clone()).await.1, 3, "{}", f.name);
        let asked = f
            .notifications
            .requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap();
        assert!(asked.unread_only, "{}: {asked:?}", f.name);

        for (sequence, post_id) in [(5, "p4"), (6, "p3")] {
            f.posts.log.push(WatchEventsResponse {
                sequence,
                epoch: "e1".into(),
                event: Some(Event::PostDeleted(PostDeleted {
                    post_id: post_id.into(),
                    author_id: "bob".into(),
                })),
                ..Default::default()
            });
        }
        eventually!(
            ids(f.digest.clone()).await.0 == ["p1"],
            "a deleted post leaves the digest"
        );
        // The page size bounds the digest (p4 and p3 no longer count against it).
        let one = f
            .digest
            .get_digest(as_user("alice", "USER", GetDigestRequest { page_size: 1 }))
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<&str> = one.posts.iter().map(|p| p.post_id.as_str()).collect();
        assert_eq!(ids, ["p1"], "{}", f.name);
        // Someone who follows nobody gets an empty digest.
        let nobody = f
            .digest
            .get_digest(as_user("dave", "USER", GetDigestRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert!(nobody.posts.is_empty(), "{}", f.name);
        stop.send(true).unwrap();
        consumer.await.unwrap();
    }
}

#[tokio::test]
async fn an_unavailable_upstream_is_reported_with_its_code() {
    let (fixtures, _dbs) = fixtures("digest_upstream", 0).await;
    for f in &fixtures {
        sqlx::query(
            "INSERT INTO digest_posts (post_id, author_id, create_time) VALUES ('p1', 'bob', 1)",
        )
        .execute(f.digest.db().pool())
        .await
        .unwrap();
        f.digest
            .follow_author(as_user(
                "alice",
                "USER",
                FollowAuthorRequest {
                    author_id: "bob".into(),
                },
            ))
            .await
            .unwrap();
        *f.posts.fail.lock().unwrap() = Some(Code::Unavailable);
        let err = f
            .digest
            .get_digest(as_user("alice", "USER", GetDigestRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{}: {err:?}", f.name);
        assert!(err.message().contains("PostService.GetPost"), "{err:?}");
    }
}
