//! In-memory stand-ins for the upstream services a service under test calls, served over
//! `tessera_client::Channel::from_service(XServiceServer::from_arc(fake.clone()))`.
//!
//! Each fake answers the calls some test needs and records them in [`Calls`]; everything else
//! is UNIMPLEMENTED. `WatchEvents` serves an [`EventLog`] the test pushes events into.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::Stream;
use tessera::{
    comments::v1::{
        Comment, CreateCommentRequest, CreateCommentResponse, DeleteCommentRequest,
        DeleteCommentResponse, ListCommentsRequest, ListCommentsResponse,
        WatchEventsRequest as CommentWatch, WatchEventsResponse as CommentEvent,
        comment_service_server::CommentService,
    },
    posts::v1::{
        CreatePostRequest, CreatePostResponse, DeletePostRequest, DeletePostResponse,
        GetPostRequest, GetPostResponse, ListPostsRequest, ListPostsResponse, Post,
        UpdatePostRequest, UpdatePostResponse, WatchEventsRequest as PostWatch,
        WatchEventsResponse as PostEvent, post_service_server::PostService,
    },
    users::v1::{
        BatchGetUsersRequest, BatchGetUsersResponse, CreateUserRequest, CreateUserResponse,
        DeleteUserRequest, DeleteUserResponse, GetJwksRequest, GetJwksResponse, GetUserRequest,
        GetUserResponse, LoginRequest, LoginResponse, LogoutRequest, LogoutResponse,
        RefreshTokenRequest, RefreshTokenResponse, SetUserRoleRequest, SetUserRoleResponse, User,
        WatchEventsRequest as UserWatch, WatchEventsResponse as UserEvent,
        user_service_server::UserService,
    },
};
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status, metadata::MetadataMap};

/// A fake's server-streaming response.
pub type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What a fake answers to a method no test needs.
pub fn not_faked<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in this fake"))
}

/// A lock that a panicking test thread does not poison for the others.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An upstream event log served from WatchEvents: the backlog after the cursor, then new
/// events as they are pushed (or, with `replay_all`, everything on every connection and
/// then the end of the stream, so the consumer reconnects and sees it all again).
pub struct EventLog<E> {
    events: watch::Sender<Vec<E>>,
    replay_all: bool,
    connections: AtomicUsize,
}

impl<E> Default for EventLog<E> {
    fn default() -> Self {
        Self {
            events: watch::channel(Vec::new()).0,
            replay_all: false,
            connections: AtomicUsize::new(0),
        }
    }
}

impl<E: Clone + Send + Sync + 'static> EventLog<E> {
    /// An empty log to share between a fake and its test; `replay_all` as above.
    pub fn new(replay_all: bool) -> Arc<Self> {
        Arc::new(Self {
            replay_all,
            ..Self::default()
        })
    }

    /// Appends an event and wakes the WatchEvents streams waiting for the next one.
    pub fn push(&self, e: E) {
        self.events.send_modify(|v| v.push(e));
    }

    /// How many times WatchEvents was opened.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The WatchEvents stream after `after`; `seq` reads an event's sequence.
    pub fn serve(&self, after: i64, seq: fn(&E) -> i64) -> BoxStream<E> {
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

/// What reached the fakes (share one between them to see a whole fan-out).
#[derive(Default)]
pub struct Calls {
    /// GetPost requests so far; read it with [`Calls::get`].
    pub get_post: AtomicUsize,
    /// CreatePost requests so far.
    pub create_post: AtomicUsize,
    /// ListComments requests so far.
    pub list_comments: AtomicUsize,
    /// BatchGetUsers requests so far, including those refused as too large.
    pub batch_get_users: AtomicUsize,
    /// The size of each BatchGetUsers request.
    pub batch_sizes: Mutex<Vec<usize>>,
    /// Selected headers of the last request, by name.
    pub headers: Mutex<HashMap<String, String>>,
}

impl Calls {
    /// One counter's value: `Calls::get(&calls.get_post)`.
    pub fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    fn record(&self, counter: &AtomicUsize, metadata: &MetadataMap) {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut headers = lock(&self.headers);
        headers.clear();
        for name in ["authorization", "grpc-timeout", "traceparent", "x-custom"] {
            if let Some(v) = metadata.get(name).and_then(|v| v.to_str().ok()) {
                headers.insert(name.to_owned(), v.to_owned());
            }
        }
    }

    /// Header `name` of the last recorded request, if it is one of the headers kept.
    pub fn header(&self, name: &str) -> Option<String> {
        lock(&self.headers).get(name).cloned()
    }
}

/// PostService: GetPost from `posts` (or failing with `fail`), CreatePost echoing the title as
/// post "new", WatchEvents from `log`.
#[derive(Default)]
pub struct FakePosts {
    /// What GetPost answers from, by post id; [`FakePosts::add`] fills it.
    pub posts: Mutex<HashMap<String, Post>>,
    /// When set, GetPost fails with this code.
    pub fail: Mutex<Option<Code>>,
    /// The events WatchEvents serves.
    pub log: Arc<EventLog<PostEvent>>,
    /// Where this fake records its calls.
    pub calls: Arc<Calls>,
}

impl FakePosts {
    /// Adds an empty post by `author_id`.
    pub fn add(&self, post_id: &str, author_id: &str) {
        lock(&self.posts).insert(
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
        request: Request<CreatePostRequest>,
    ) -> Result<Response<CreatePostResponse>, Status> {
        self.calls
            .record(&self.calls.create_post, request.metadata());
        let req = request.into_inner();
        Ok(Response::new(CreatePostResponse {
            post: Some(Post {
                post_id: "new".into(),
                title: req.title,
                ..Default::default()
            }),
        }))
    }

    async fn get_post(
        &self,
        request: Request<GetPostRequest>,
    ) -> Result<Response<GetPostResponse>, Status> {
        self.calls.record(&self.calls.get_post, request.metadata());
        if let Some(code) = *lock(&self.fail) {
            return Err(Status::new(code, "posts is down"));
        }
        let id = request.into_inner().post_id;
        match lock(&self.posts).get(&id) {
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
        not_faked()
    }

    async fn update_post(
        &self,
        _: Request<UpdatePostRequest>,
    ) -> Result<Response<UpdatePostResponse>, Status> {
        not_faked()
    }

    async fn delete_post(
        &self,
        _: Request<DeletePostRequest>,
    ) -> Result<Response<DeletePostResponse>, Status> {
        not_faked()
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

/// CommentService: ListComments over `comments` (one page of `page_size`, 1 to 100, then a
/// "next" token), WatchEvents from `log`.
#[derive(Default)]
pub struct FakeComments {
    /// The comments of every post; ListComments picks those of the requested one.
    pub comments: Vec<Comment>,
    /// The events WatchEvents serves.
    pub log: Arc<EventLog<CommentEvent>>,
    /// Where this fake records its calls.
    pub calls: Arc<Calls>,
}

#[tonic::async_trait]
impl CommentService for FakeComments {
    async fn create_comment(
        &self,
        _: Request<CreateCommentRequest>,
    ) -> Result<Response<CreateCommentResponse>, Status> {
        not_faked()
    }

    async fn list_comments(
        &self,
        request: Request<ListCommentsRequest>,
    ) -> Result<Response<ListCommentsResponse>, Status> {
        self.calls
            .record(&self.calls.list_comments, request.metadata());
        let req = request.into_inner();
        let Some(size) = usize::try_from(req.page_size)
            .ok()
            .filter(|size| (1..=100).contains(size))
        else {
            return Err(Status::invalid_argument("page_size out of range"));
        };
        let all: Vec<_> = self
            .comments
            .iter()
            .filter(|c| c.post_id == req.post_id)
            .cloned()
            .collect();
        let next_page_token = if all.len() > size {
            "next".to_owned()
        } else {
            String::new()
        };
        Ok(Response::new(ListCommentsResponse {
            comments: all.into_iter().take(size).collect(),
            next_page_token,
        }))
    }

    async fn delete_comment(
        &self,
        _: Request<DeleteCommentRequest>,
    ) -> Result<Response<DeleteCommentResponse>, Status> {
        not_faked()
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

/// UserService: GetUser and BatchGetUsers (at most 100 ids) over `users`, WatchEvents from
/// `log`.
#[derive(Default)]
pub struct FakeUsers {
    /// What GetUser and BatchGetUsers answer from, by user id.
    pub users: HashMap<String, User>,
    /// The events WatchEvents serves.
    pub log: Arc<EventLog<UserEvent>>,
    /// Where this fake records its calls (BatchGetUsers only).
    pub calls: Arc<Calls>,
}

#[tonic::async_trait]
impl UserService for FakeUsers {
    async fn create_user(
        &self,
        _: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        not_faked()
    }

    async fn login(&self, _: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        not_faked()
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let id = request.into_inner().user_id;
        match self.users.get(&id) {
            Some(user) => Ok(Response::new(GetUserResponse {
                user: Some(user.clone()),
            })),
            None => Err(Status::not_found("user not found")),
        }
    }

    async fn refresh_token(
        &self,
        _: Request<RefreshTokenRequest>,
    ) -> Result<Response<RefreshTokenResponse>, Status> {
        not_faked()
    }

    async fn logout(&self, _: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        not_faked()
    }

    async fn batch_get_users(
        &self,
        request: Request<BatchGetUsersRequest>,
    ) -> Result<Response<BatchGetUsersResponse>, Status> {
        self.calls
            .record(&self.calls.batch_get_users, request.metadata());
        let ids = request.into_inner().user_ids;
        lock(&self.calls.batch_sizes).push(ids.len());
        if ids.len() > 100 {
            return Err(Status::invalid_argument("at most 100 user_ids"));
        }
        Ok(Response::new(BatchGetUsersResponse {
            users: ids
                .iter()
                .filter_map(|id| self.users.get(id).cloned())
                .collect(),
        }))
    }

    async fn get_jwks(
        &self,
        _: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        not_faked()
    }

    async fn set_user_role(
        &self,
        _: Request<SetUserRoleRequest>,
    ) -> Result<Response<SetUserRoleResponse>, Status> {
        not_faked()
    }

    async fn delete_user(
        &self,
        _: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        not_faked()
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
