//! Fakes for the services comments talks to, and a harness per database.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use prost::Message;
use tempfile::TempDir;
use tessera::{
    comments::v1::{
        WatchEventsResponse, comment_service_client::CommentServiceClient,
        comment_service_server::CommentServiceServer, watch_events_response::Event,
    },
    posts::v1::{
        CreatePostRequest, CreatePostResponse, DeletePostRequest, DeletePostResponse,
        GetPostRequest, GetPostResponse, ListPostsRequest, ListPostsResponse, Post,
        UpdatePostRequest, UpdatePostResponse, WatchEventsRequest as PostWatch,
        WatchEventsResponse as PostEvent,
        post_service_client::PostServiceClient,
        post_service_server::{PostService, PostServiceServer},
    },
    users::v1::{
        BatchGetUsersRequest, BatchGetUsersResponse, CreateUserRequest, CreateUserResponse,
        DeleteUserRequest, DeleteUserResponse, GetJwksRequest, GetJwksResponse, GetUserRequest,
        GetUserResponse, LoginRequest, LoginResponse, SetUserRoleRequest, SetUserRoleResponse,
        WatchEventsRequest as UserWatch, WatchEventsResponse as UserEvent,
        user_service_client::UserServiceClient,
        user_service_server::{UserService, UserServiceServer},
    },
};
use tessera_client::Channel;
use tessera_comments::{Comments, MIGRATIONS};
use tessera_mesh::auth::{EndUser, UserClaims};
use tessera_store::{Db, testing};
use tonic::{Request, Response, Status};

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn nope<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in this fake"))
}

/// An upstream event log a fake serves from WatchEvents.
pub struct Log<E> {
    pub events: Mutex<Vec<E>>,
    /// Serve every event on each connection, ignoring `after_sequence`, then end the stream
    /// (so the consumer reconnects and sees them all again).
    pub replay_all: bool,
    pub connections: AtomicUsize,
}

impl<E: Clone + Send + Sync + 'static> Log<E> {
    pub fn new(replay_all: bool) -> Arc<Self> {
        Arc::new(Self {
            events: Mutex::new(Vec::new()),
            replay_all,
            connections: AtomicUsize::new(0),
        })
    }

    pub fn push(&self, e: E) {
        self.events.lock().unwrap().push(e);
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn serve(&self, after: i64, seq: impl Fn(&E) -> i64) -> BoxStream<E> {
        self.connections.fetch_add(1, Ordering::SeqCst);
        let events: Vec<Result<E, Status>> = self
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| self.replay_all || seq(e) > after)
            .cloned()
            .map(Ok)
            .collect();
        let backlog = futures::stream::iter(events);
        if self.replay_all {
            Box::pin(backlog)
        } else {
            // Stay connected, like a live WatchEvents.
            Box::pin(backlog.chain(futures::stream::pending()))
        }
    }
}

pub struct FakePosts {
    pub posts: Mutex<HashMap<String, Post>>,
    pub log: Arc<Log<PostEvent>>,
    /// When set, GetPost fails with this code.
    pub fail: Mutex<Option<tonic::Code>>,
}

impl FakePosts {
    pub fn add(&self, post_id: &str, author_id: &str) {
        self.posts.lock().unwrap().insert(
            post_id.to_owned(),
            Post {
                post_id: post_id.to_owned(),
                author_id: author_id.to_owned(),
                ..Default::default()
            },
        );
    }
}

#[tonic::async_trait]
impl PostService for FakePosts {
    async fn create_post(
        &self,
        _: Request<CreatePostRequest>,
    ) -> Result<Response<CreatePostResponse>, Status> {
        nope()
    }

    async fn get_post(
        &self,
        request: Request<GetPostRequest>,
    ) -> Result<Response<GetPostResponse>, Status> {
        if let Some(code) = *self.fail.lock().unwrap() {
            return Err(Status::new(code, "posts is down"));
        }
        let id = request.into_inner().post_id;
        match self.posts.lock().unwrap().get(&id) {
            Some(p) => Ok(Response::new(GetPostResponse {
                post: Some(p.clone()),
            })),
            None => Err(Status::not_found(format!("post {id} not found"))),
        }
    }

    async fn list_posts(
        &self,
        _: Request<ListPostsRequest>,
    ) -> Result<Response<ListPostsResponse>, Status> {
        nope()
    }

    async fn update_post(
        &self,
        _: Request<UpdatePostRequest>,
    ) -> Result<Response<UpdatePostResponse>, Status> {
        nope()
    }

    async fn delete_post(
        &self,
        _: Request<DeletePostRequest>,
    ) -> Result<Response<DeletePostResponse>, Status> {
        nope()
    }

    type WatchEventsStream = BoxStream<PostEvent>;

    async fn watch_events(
        &self,
        request: Request<PostWatch>,
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

/// One comment service over one database, with its fakes.
pub struct Harness {
    pub name: &'static str,
    pub comments: Comments,
    pub client: CommentServiceClient<Channel>,
    pub posts: Arc<FakePosts>,
    pub posts_client: PostServiceClient<Channel>,
    pub users: Arc<FakeUsers>,
    pub users_client: UserServiceClient<Channel>,
    _dir: Option<TempDir>,
}

/// A harness on a fresh SQLite file, and one on PostgreSQL when configured.
pub async fn harnesses(label: &str) -> Vec<Harness> {
    harnesses_with(label, false).await
}

pub async fn harnesses_with(label: &str, replay_all: bool) -> Vec<Harness> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("comments.db");
    let sqlite = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
    let mut out = vec![harness("sqlite", sqlite, Some(dir), replay_all).await];
    if let Some(pg) = testing::postgres(label, MIGRATIONS).await.unwrap() {
        out.push(harness("postgres", pg, None, replay_all).await);
    }
    out
}

async fn harness(name: &'static str, db: Db, dir: Option<TempDir>, replay_all: bool) -> Harness {
    let posts = Arc::new(FakePosts {
        posts: Mutex::new(HashMap::new()),
        log: Log::new(replay_all),
        fail: Mutex::new(None),
    });
    let users = Arc::new(FakeUsers {
        log: Log::new(replay_all),
    });
    let posts_client = PostServiceClient::new(Channel::from_service(PostServiceServer::from_arc(
        posts.clone(),
    )));
    let users_client = UserServiceClient::new(Channel::from_service(UserServiceServer::from_arc(
        users.clone(),
    )));
    let comments = Comments::with_db(db, posts_client.clone()).await.unwrap();
    let client = CommentServiceClient::new(Channel::from_service(CommentServiceServer::new(
        comments.clone(),
    )));
    Harness {
        name,
        comments,
        client,
        posts,
        posts_client,
        users,
        users_client,
        _dir: dir,
    }
}

/// A request as the verified end user `sub` with `role`.
pub fn as_user<T>(sub: &str, role: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.extensions_mut().insert(EndUser {
        claims: UserClaims {
            sub: sub.to_owned(),
            role: role.to_owned(),
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

/// Every event in the comment outbox so far, decoded.
pub async fn outbox(comments: &Comments) -> Vec<WatchEventsResponse> {
    comments
        .db()
        .read_events(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            let mut msg = WatchEventsResponse::decode(e.payload.as_slice()).unwrap();
            msg.sequence = e.sequence;
            msg
        })
        .collect()
}

pub fn deleted_ids(events: &[WatchEventsResponse]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::CommentDeleted(d)) => Some(d.comment_id.clone()),
            _ => None,
        })
        .collect()
}
