//! Fake downstream services that record what reached them.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use tessera::{
    comments::v1::{
        Comment, CreateCommentRequest, CreateCommentResponse, DeleteCommentRequest,
        DeleteCommentResponse, ListCommentsRequest, ListCommentsResponse,
        WatchEventsRequest as CommentWatch, WatchEventsResponse as CommentEvent,
        comment_service_server::CommentService,
    },
    notifications::v1::{
        ListNotificationsRequest, ListNotificationsResponse, MarkNotificationsReadRequest,
        MarkNotificationsReadResponse, Notification, SubscribeNotificationsRequest,
        SubscribeNotificationsResponse, notification_service_server::NotificationService,
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
        GetUserResponse, LoginRequest, LoginResponse, SetUserRoleRequest, SetUserRoleResponse,
        User, WatchEventsRequest as UserWatch, WatchEventsResponse as UserEvent,
        user_service_server::UserService,
    },
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, metadata::MetadataMap};

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the fakes saw.
#[derive(Default)]
pub struct Calls {
    pub get_post: AtomicUsize,
    pub create_post: AtomicUsize,
    pub list_comments: AtomicUsize,
    pub batch_get_users: AtomicUsize,
    /// The size of each BatchGetUsers request.
    pub batch_sizes: Mutex<Vec<usize>>,
    /// Selected headers of the last request, by name.
    pub headers: Mutex<HashMap<String, String>>,
}

impl Calls {
    pub fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    fn record(&self, counter: &AtomicUsize, metadata: &MetadataMap) {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut headers = self.headers.lock().unwrap();
        headers.clear();
        for name in ["authorization", "grpc-timeout", "traceparent", "x-custom"] {
            if let Some(v) = metadata.get(name).and_then(|v| v.to_str().ok()) {
                headers.insert(name.to_owned(), v.to_owned());
            }
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lock().unwrap().get(name).cloned()
    }
}

fn nope<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in this fake"))
}

pub struct FakePosts {
    pub calls: Arc<Calls>,
    pub posts: HashMap<String, Post>,
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
        let id = request.into_inner().post_id;
        match self.posts.get(&id) {
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
        _: Request<PostWatch>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        nope()
    }
}

pub struct FakeComments {
    pub calls: Arc<Calls>,
    pub comments: Vec<Comment>,
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
        request: Request<ListCommentsRequest>,
    ) -> Result<Response<ListCommentsResponse>, Status> {
        self.calls
            .record(&self.calls.list_comments, request.metadata());
        let req = request.into_inner();
        if !(1..=100).contains(&req.page_size) {
            return Err(Status::invalid_argument("page_size out of range"));
        }
        let all: Vec<_> = self
            .comments
            .iter()
            .filter(|c| c.post_id == req.post_id)
            .cloned()
            .collect();
        let size = usize::try_from(req.page_size).unwrap();
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
        nope()
    }

    type WatchEventsStream = BoxStream<CommentEvent>;

    async fn watch_events(
        &self,
        _: Request<CommentWatch>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        nope()
    }
}

pub struct FakeUsers {
    pub calls: Arc<Calls>,
    pub users: HashMap<String, User>,
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
        request: Request<BatchGetUsersRequest>,
    ) -> Result<Response<BatchGetUsersResponse>, Status> {
        self.calls
            .record(&self.calls.batch_get_users, request.metadata());
        let ids = request.into_inner().user_ids;
        self.calls.batch_sizes.lock().unwrap().push(ids.len());
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
        _: Request<UserWatch>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        nope()
    }
}

/// Streams `count` notifications, then ends.
pub struct FakeNotifications {
    pub count: usize,
}

#[tonic::async_trait]
impl NotificationService for FakeNotifications {
    async fn list_notifications(
        &self,
        _: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        nope()
    }

    async fn mark_notifications_read(
        &self,
        _: Request<MarkNotificationsReadRequest>,
    ) -> Result<Response<MarkNotificationsReadResponse>, Status> {
        nope()
    }

    type SubscribeNotificationsStream = BoxStream<SubscribeNotificationsResponse>;

    async fn subscribe_notifications(
        &self,
        _: Request<SubscribeNotificationsRequest>,
    ) -> Result<Response<Self::SubscribeNotificationsStream>, Status> {
        let items: Vec<_> = (0..self.count)
            .map(|i| {
                Ok(SubscribeNotificationsResponse {
                    notification: Some(Notification {
                        notification_id: format!("n{i}"),
                        ..Default::default()
                    }),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

pub fn user(id: &str) -> User {
    User {
        user_id: id.to_owned(),
        username: format!("name-{id}"),
        ..Default::default()
    }
}

pub fn comment(id: usize, post_id: &str, author_id: &str) -> Comment {
    Comment {
        comment_id: format!("c{id}"),
        post_id: post_id.to_owned(),
        author_id: author_id.to_owned(),
        body: format!("comment {id}"),
        create_time: None,
    }
}
