//! Fake upstream services and a harness per database.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use tempfile::TempDir;
use tessera::{
    comments::v1::{
        Comment, CommentCreated, CommentDeleted, CreateCommentRequest, CreateCommentResponse,
        DeleteCommentRequest, DeleteCommentResponse, ListCommentsRequest, ListCommentsResponse,
        WatchEventsRequest as CommentWatch, WatchEventsResponse as CommentEvent,
        comment_service_client::CommentServiceClient,
        comment_service_server::{CommentService, CommentServiceServer},
        watch_events_response::Event as CommentKind,
    },
    notifications::v1::{
        ListNotificationsRequest, Notification,
        notification_service_client::NotificationServiceClient,
        notification_service_server::NotificationServiceServer,
    },
    users::v1::{
        BatchGetUsersRequest, BatchGetUsersResponse, CreateUserRequest, CreateUserResponse,
        DeleteUserRequest, DeleteUserResponse, GetJwksRequest, GetJwksResponse, GetUserRequest,
        GetUserResponse, LoginRequest, LoginResponse, SetUserRoleRequest, SetUserRoleResponse,
        UserDeleted, WatchEventsRequest as UserWatch, WatchEventsResponse as UserEvent,
        user_service_client::UserServiceClient,
        user_service_server::{UserService, UserServiceServer},
        watch_events_response::Event as UserKind,
    },
};
use tessera_client::Channel;
use tessera_mesh::auth::{EndUser, UserClaims};
use tessera_notifications::{MIGRATIONS, Notifications, follow_comment_events, follow_user_events};
use tessera_store::{Db, testing};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn nope<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in this fake"))
}

/// An upstream event log served from WatchEvents: the backlog after the cursor, then new
/// events as they are pushed (or, with `replay_all`, everything on every connection and
/// then the end of the stream, so the consumer reconnects and sees it all again).
pub struct Log<E> {
    events: watch::Sender<Vec<E>>,
    replay_all: bool,
    connections: AtomicUsize,
}

impl<E: Clone + Send + Sync + 'static> Log<E> {
    pub fn new(replay_all: bool) -> Arc<Self> {
        Arc::new(Self {
            events: watch::channel(Vec::new()).0,
            replay_all,
            connections: AtomicUsize::new(0),
        })
    }

    pub fn push(&self, e: E) {
        self.events.send_modify(|v| v.push(e));
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn serve(&self, after: i64, seq: fn(&E) -> i64) -> BoxStream<E> {
        self.connections.fetch_add(1, Ordering::SeqCst);
        if self.replay_all {
            let all: Vec<_> = self.events.borrow().iter().cloned().map(Ok).collect();
            return Box::pin(futures::stream::iter(all));
        }
        let rx = self.events.subscribe();
        Box::pin(futures::stream::unfold(
            (rx, after),
            move |(mut rx, after)| async move {
                loop {
                    let next = rx
                        .borrow_and_update()
                        .iter()
                        .find(|e| seq(e) > after)
                        .cloned();
                    if let Some(e) = next {
                        let after = seq(&e);
                        return Some((Ok(e), (rx, after)));
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        ))
    }
}

pub struct FakeComments {
    pub log: Arc<Log<CommentEvent>>,
}

#[tonic::async_trait]
impl CommentService for FakeComments {
    async fn create_comment(
        &self,
        _: Request<CreateCommentRequest>,
    ) -> Result<Response<CreateCommentResponse>, Status> {
        nope()
    }

    async fn list_comments(
        &self,
        _: Request<ListCommentsRequest>,
    ) -> Result<Response<ListCommentsResponse>, Status> {
        nope()
    }

    async fn delete_comment(
        &self,
        _: Request<DeleteCommentRequest>,
    ) -> Result<Response<DeleteCommentResponse>, Status> {
        nope()
    }

    type WatchEventsStream = BoxStream<CommentEvent>;

    async fn watch_events(
        &self,
        request: Request<CommentWatch>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let after = request.into_inner().after_sequence;
        Ok(Response::new(self.log.serve(after, |e| e.sequence)))
    }
}

pub struct FakeUsers {
    pub log: Arc<Log<UserEvent>>,
}

#[tonic::async_trait]
impl UserService for FakeUsers {
    async fn create_user(
        &self,
        _: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        nope()
    }

    async fn login(&self, _: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        nope()
    }

    async fn get_user(
        &self,
        _: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        nope()
    }

    async fn batch_get_users(
        &self,
        _: Request<BatchGetUsersRequest>,
    ) -> Result<Response<BatchGetUsersResponse>, Status> {
        nope()
    }

    async fn get_jwks(
        &self,
        _: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        nope()
    }

    async fn set_user_role(
        &self,
        _: Request<SetUserRoleRequest>,
    ) -> Result<Response<SetUserRoleResponse>, Status> {
        nope()
    }

    async fn delete_user(
        &self,
        _: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        nope()
    }

    type WatchEventsStream = BoxStream<UserEvent>;

    async fn watch_events(
        &self,
        request: Request<UserWatch>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let after = request.into_inner().after_sequence;
        Ok(Response::new(self.log.serve(after, |e| e.sequence)))
    }
}

/// One notification service over one database, its fakes, and its running consumers.
pub struct Harness {
    pub name: &'static str,
    pub service: Notifications,
    pub client: NotificationServiceClient<Channel>,
    pub comments: Arc<Log<CommentEvent>>,
    pub users: Arc<Log<UserEvent>>,
    comments_client: CommentServiceClient<Channel>,
    users_client: UserServiceClient<Channel>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next_sequence: i64,
    _dir: Option<TempDir>,
}

impl Harness {
    /// Starts both consumers.
    pub fn start(&mut self) {
        self.tasks.push(tokio::spawn(follow_comment_events(
            self.service.clone(),
            self.comments_client.clone(),
            self.shutdown.subscribe(),
        )));
        self.tasks.push(tokio::spawn(follow_user_events(
            self.service.clone(),
            self.users_client.clone(),
            self.shutdown.subscribe(),
        )));
    }

    /// Stops the consumers, within a bound.
    pub async fn stop(&mut self) {
        self.shutdown.send_replace(true);
        for task in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("consumers stop on shutdown")
                .unwrap();
        }
        self.shutdown.send_replace(false);
    }

    fn seq(&mut self) -> i64 {
        self.next_sequence += 1;
        self.next_sequence
    }

    /// Publishes CommentCreated upstream; returns the comment's sequence.
    pub fn comment(
        &mut self,
        comment_id: &str,
        post_id: &str,
        author: &str,
        post_author: &str,
    ) -> i64 {
        let sequence = self.seq();
        self.comments.push(CommentEvent {
            sequence,
            create_time: None,
            event: Some(CommentKind::CommentCreated(CommentCreated {
                comment: Some(Comment {
                    comment_id: comment_id.into(),
                    post_id: post_id.into(),
                    author_id: author.into(),
                    body: "hi".into(),
                    create_time: None,
                }),
                post_author_id: post_author.into(),
            })),
        });
        sequence
    }

    pub fn delete_comment(&mut self, comment_id: &str, post_id: &str) -> i64 {
        let sequence = self.seq();
        self.comments.push(CommentEvent {
            sequence,
            create_time: None,
            event: Some(CommentKind::CommentDeleted(CommentDeleted {
                comment_id: comment_id.into(),
                post_id: post_id.into(),
            })),
        });
        sequence
    }

    pub fn delete_user(&mut self, user_id: &str) -> i64 {
        let sequence = self.seq();
        self.users.push(UserEvent {
            sequence,
            create_time: None,
            event: Some(UserKind::UserDeleted(UserDeleted {
                user_id: user_id.into(),
            })),
        });
        sequence
    }

    /// Waits until the consumer's cursor reaches `sequence`.
    pub async fn caught_up(&self, cursor: &str, sequence: i64) {
        eventually(
            &format!("{} {cursor} reaches {sequence}", self.name),
            || async { self.service.db().cursor(cursor).await.unwrap() >= sequence },
        )
        .await;
    }

    /// All of `user`'s notifications, newest first.
    pub async fn all(&self, user: &str) -> Vec<Notification> {
        self.client
            .clone()
            .list_notifications(as_user(
                user,
                ListNotificationsRequest {
                    page_size: 100,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .notifications
    }
}

pub async fn harnesses(label: &str) -> Vec<Harness> {
    harnesses_with(label, false).await
}

pub async fn harnesses_with(label: &str, replay_all: bool) -> Vec<Harness> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notifications.db");
    let sqlite = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
    let mut out = vec![harness("sqlite", sqlite, Some(dir), replay_all).await];
    if let Some(pg) = testing::postgres(label, MIGRATIONS).await.unwrap() {
        out.push(harness("postgres", pg, None, replay_all).await);
    }
    out
}

pub async fn harness(
    name: &'static str,
    db: Db,
    dir: Option<TempDir>,
    replay_all: bool,
) -> Harness {
    let comments = Log::new(replay_all);
    let users = Log::new(replay_all);
    let comments_client = CommentServiceClient::new(Channel::from_service(
        CommentServiceServer::new(FakeComments {
            log: comments.clone(),
        }),
    ));
    let users_client =
        UserServiceClient::new(Channel::from_service(UserServiceServer::new(FakeUsers {
            log: users.clone(),
        })));
    let service = Notifications::with_db(db).await.unwrap();
    let client = NotificationServiceClient::new(Channel::from_service(
        NotificationServiceServer::new(service.clone()),
    ));
    Harness {
        name,
        service,
        client,
        comments,
        users,
        comments_client,
        users_client,
        shutdown: watch::channel(false).0,
        tasks: Vec::new(),
        next_sequence: 0,
        _dir: dir,
    }
}

/// A request as the verified end user `sub`.
pub fn as_user<T>(sub: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.extensions_mut().insert(EndUser {
        claims: UserClaims {
            sub: sub.to_owned(),
            role: "USER".to_owned(),
            exp: u64::MAX,
            iat: 0,
        },
        token: "test-token".into(),
    });
    req
}

/// Polls `cond` until it holds, failing after a bound.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
