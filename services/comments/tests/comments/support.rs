//! The comment service over in-process channels with fake upstreams, one harness per
//! database.

use std::sync::Arc;

use prost::Message;
use tessera::{
    comments::v1::{
        Comment, CreateCommentRequest, WatchEventsResponse,
        comment_service_client::CommentServiceClient, comment_service_server::CommentServiceServer,
        watch_events_response::Event,
    },
    posts::v1::{post_service_client::PostServiceClient, post_service_server::PostServiceServer},
    users::v1::{
        Role, User, user_service_client::UserServiceClient, user_service_server::UserServiceServer,
    },
};
use tessera_client::Channel;
use tessera_comments::{Comments, MIGRATIONS};
use tessera_store::testing::{self, TestDb};
use tessera_testing::fakes::{EventLog, FakePosts, FakeUsers};
pub(crate) use tessera_testing::{as_user, eventually};

/// One comment service over one database, with its fakes.
pub(crate) struct Harness {
    pub(crate) name: &'static str,
    pub(crate) comments: Comments,
    pub(crate) client: CommentServiceClient<Channel>,
    pub(crate) posts: Arc<FakePosts>,
    /// The fake PostService's channel (the consumers' `WatchEvents` go over it).
    pub(crate) posts_channel: Channel,
    pub(crate) users: Arc<FakeUsers>,
    pub(crate) users_channel: Channel,
    _db: TestDb,
}

impl Harness {
    /// Creates a comment as `user` (role USER); it must succeed.
    pub(crate) async fn comment(&self, user: &str, req: CreateCommentRequest) -> Comment {
        self.client
            .clone()
            .create_comment(as_user(user, "USER", req))
            .await
            .unwrap()
            .into_inner()
            .comment
            .unwrap()
    }
}

/// A harness on a fresh SQLite file, and one on PostgreSQL when configured.
pub(crate) async fn harnesses(label: &str) -> Vec<Harness> {
    harnesses_with(label, false).await
}

pub(crate) async fn harnesses_with(label: &str, replay_all: bool) -> Vec<Harness> {
    let mut out = Vec::new();
    for db in testing::databases(label, MIGRATIONS).await {
        out.push(harness(db, replay_all).await);
    }
    out
}

async fn harness(db: TestDb, replay_all: bool) -> Harness {
    let posts = Arc::new(FakePosts {
        log: EventLog::new(replay_all),
        ..FakePosts::default()
    });
    let users = Arc::new(FakeUsers {
        log: EventLog::new(replay_all),
        users: stored_roles(),
        ..FakeUsers::default()
    });
    let posts_channel = Channel::from_service(PostServiceServer::from_arc(posts.clone()));
    let users_channel = Channel::from_service(UserServiceServer::from_arc(users.clone()));
    let comments = Comments::with_db(db.db.clone(), PostServiceClient::new(posts_channel.clone()))
        .await
        .unwrap()
        .with_users(UserServiceClient::new(users_channel.clone()));
    let client = CommentServiceClient::new(Channel::from_service(CommentServiceServer::new(
        comments.clone(),
    )));
    Harness {
        name: db.name,
        comments,
        client,
        posts,
        posts_channel,
        users,
        users_channel,
        _db: db,
    }
}

/// The roles UserService holds now: `mod` and `root` are what their tokens say; `stale`
/// was demoted to USER after its MODERATOR token was issued; `gone` was deleted (absent).
fn stored_roles() -> std::collections::HashMap<String, User> {
    [
        ("mod", Role::Moderator),
        ("root", Role::Admin),
        ("stale", Role::User),
    ]
    .into_iter()
    .map(|(id, role)| {
        let user = User {
            user_id: id.into(),
            role: role as i32,
            ..User::default()
        };
        (id.to_owned(), user)
    })
    .collect()
}

/// Every event in the comment outbox so far, decoded.
pub(crate) async fn outbox(comments: &Comments) -> Vec<WatchEventsResponse> {
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

pub(crate) fn deleted_ids(events: &[WatchEventsResponse]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::CommentDeleted(d)) => Some(d.comment_id.clone()),
            _ => None,
        })
        .collect()
}
