//! Fake downstream services that record what reached them: the shared ones from
//! `tessera_testing::fakes`, plus a NotificationService only the gateway needs.

use tessera::{
    comments::v1::Comment,
    notifications::v1::{
        ListNotificationsRequest, ListNotificationsResponse, MarkNotificationsReadRequest,
        MarkNotificationsReadResponse, Notification, SubscribeNotificationsRequest,
        SubscribeNotificationsResponse, notification_service_server::NotificationService,
    },
    users::v1::User,
};
use tessera_testing::fakes::{BoxStream, not_faked};
pub(crate) use tessera_testing::fakes::{Calls, FakeComments, FakePosts, FakeUsers};
use tonic::{Request, Response, Status};

/// Streams `count` notifications, then ends.
pub(crate) struct FakeNotifications {
    pub(crate) count: usize,
}

#[tonic::async_trait]
impl NotificationService for FakeNotifications {
    async fn list_notifications(
        &self,
        _: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        not_faked()
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

pub(crate) fn user(id: &str) -> User {
    User {
        user_id: id.to_owned(),
        username: format!("name-{id}"),
        ..Default::default()
    }
}

pub(crate) fn comment(id: usize, post_id: &str, author_id: &str) -> Comment {
    Comment {
        comment_id: format!("c{id}"),
        post_id: post_id.to_owned(),
        author_id: author_id.to_owned(),
        body: format!("comment {id}"),
        create_time: None,
    }
}
