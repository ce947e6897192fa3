//! The notification service over in-process channels with fake upstreams, one harness per
//! database.

use std::{sync::Arc, time::Duration};

use tessera::{
    comments::v1::{
        Comment, CommentCreated, CommentDeleted, WatchEventsResponse as CommentEvent,
        comment_service_server::CommentServiceServer, watch_events_response::Event as CommentKind,
    },
    notifications::v1::{
        ListNotificationsRequest, Notification,
        notification_service_client::NotificationServiceClient,
        notification_service_server::NotificationServiceServer,
    },
    users::v1::{
        UserDeleted, WatchEventsResponse as UserEvent, user_service_server::UserServiceServer,
        watch_events_response::Event as UserKind,
    },
};
use tessera_client::Channel;
use tessera_notifications::{MIGRATIONS, Notifications, follow_comment_events, follow_user_events};
use tessera_store::testing::{self, TestDb};
use tessera_testing::fakes::{EventLog, FakeComments, FakeUsers};
pub(crate) use tessera_testing::{as_user, eventually};
use tokio::sync::watch;

/// One notification service over one database, its fakes, and its running consumers.
pub(crate) struct Harness {
    pub(crate) name: &'static str,
    pub(crate) service: Notifications,
    pub(crate) client: NotificationServiceClient<Channel>,
    pub(crate) comments: Arc<EventLog<CommentEvent>>,
    pub(crate) users: Arc<EventLog<UserEvent>>,
    comments_channel: Channel,
    users_channel: Channel,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next_sequence: i64,
    _db: TestDb,
}

impl Harness {
    /// Starts both consumers.
    pub(crate) fn start(&mut self) {
        self.tasks.push(tokio::spawn(follow_comment_events(
            self.service.clone(),
            self.comments_channel.clone(),
            self.shutdown.subscribe(),
        )));
        self.tasks.push(tokio::spawn(follow_user_events(
            self.service.clone(),
            self.users_channel.clone(),
            self.shutdown.subscribe(),
        )));
    }

    /// Stops the consumers, within a bound.
    pub(crate) async fn stop(&mut self) {
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
    pub(crate) fn comment(
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
            epoch: String::new(),
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

    pub(crate) fn delete_comment(&mut self, comment_id: &str, post_id: &str) -> i64 {
        let sequence = self.seq();
        self.comments.push(CommentEvent {
            sequence,
            create_time: None,
            epoch: String::new(),
            event: Some(CommentKind::CommentDeleted(CommentDeleted {
                comment_id: comment_id.into(),
                post_id: post_id.into(),
            })),
        });
        sequence
    }

    pub(crate) fn delete_user(&mut self, user_id: &str) -> i64 {
        let sequence = self.seq();
        self.users.push(UserEvent {
            sequence,
            create_time: None,
            epoch: String::new(),
            event: Some(UserKind::UserDeleted(UserDeleted {
                user_id: user_id.into(),
            })),
        });
        sequence
    }

    /// Waits until the consumer's cursor reaches `sequence`.
    pub(crate) async fn caught_up(&self, cursor: &str, sequence: i64) {
        eventually!(
            self.service.db().cursor(cursor).await.unwrap() >= sequence,
            "{cursor} reaches {sequence}"
        );
    }

    /// All of `user`'s notifications, newest first.
    pub(crate) async fn all(&self, user: &str) -> Vec<Notification> {
        self.client
            .clone()
            .list_notifications(as_user(
                user,
                "USER",
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

    /// The comment ids of `user`'s notifications, newest first.
    pub(crate) async fn comment_ids(&self, user: &str) -> Vec<String> {
        self.all(user)
            .await
            .into_iter()
            .map(|n| n.comment_id)
            .collect()
    }
}

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
    let comments = EventLog::new(replay_all);
    let users = EventLog::new(replay_all);
    let comments_channel = Channel::from_service(CommentServiceServer::new(FakeComments {
        log: comments.clone(),
        ..FakeComments::default()
    }));
    let users_channel = Channel::from_service(UserServiceServer::new(FakeUsers {
        log: users.clone(),
        ..FakeUsers::default()
    }));
    let service = Notifications::with_db(db.db.clone()).await.unwrap();
    let client = NotificationServiceClient::new(Channel::from_service(
        NotificationServiceServer::new(service.clone()),
    ));
    Harness {
        name: db.name,
        service,
        client,
        comments,
        users,
        comments_channel,
        users_channel,
        shutdown: watch::channel(false).0,
        tasks: Vec::new(),
        next_sequence: 0,
        _db: db,
    }
}
