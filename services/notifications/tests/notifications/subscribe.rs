//! SubscribeNotifications: live delivery to the right user, and clean ends.

use std::time::Duration;

use futures::StreamExt;
use tessera::notifications::v1::{
    SubscribeNotificationsRequest, notification_service_client::NotificationServiceClient,
    notification_service_server::NotificationServiceServer,
};
use tessera_client::Channel;
use tessera_notifications::{COMMENT_EVENTS_CURSOR, Notifications};
use tonic::{Code, Request, Streaming};

use crate::support::{as_user, eventually, harnesses};

async fn subscribe(
    client: &NotificationServiceClient<Channel>,
    user: &str,
) -> Streaming<tessera::notifications::v1::SubscribeNotificationsResponse> {
    client
        .clone()
        .subscribe_notifications(as_user(user, "USER", SubscribeNotificationsRequest {}))
        .await
        .unwrap()
        .into_inner()
}

async fn next_comment_id(
    stream: &mut Streaming<tessera::notifications::v1::SubscribeNotificationsResponse>,
) -> String {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a notification arrives")
        .unwrap()
        .unwrap()
        .notification
        .unwrap()
        .comment_id
}

#[tokio::test]
async fn subscribers_get_their_own_new_notifications() {
    for mut h in harnesses("notif_subscribe").await {
        // Something from before the subscription is not replayed on it.
        h.start();
        let before = h.comment("old", "p1", "bob", "alice");
        h.caught_up(COMMENT_EVENTS_CURSOR, before).await;

        let mut alice = subscribe(&h.client, "alice").await;
        let mut alice2 = subscribe(&h.client, "alice").await;
        let mut bob = subscribe(&h.client, "bob").await;
        assert_eq!(h.service.subscribed_users(), 2);

        h.comment("c1", "p1", "bob", "alice");
        h.comment("self", "p2", "bob", "bob"); // bob on his own post: nothing
        h.comment("c2", "p2", "carol", "bob");
        assert_eq!(next_comment_id(&mut alice).await, "c1", "{}", h.name);
        assert_eq!(next_comment_id(&mut alice2).await, "c1", "{}", h.name);
        assert_eq!(next_comment_id(&mut bob).await, "c2", "{}", h.name);

        // The client goes away: the channel is released, nothing is left running for it.
        drop(alice);
        assert_eq!(h.service.subscribed_users(), 2, "alice still has a stream");
        drop(alice2);
        drop(bob);
        let service = h.service.clone();
        eventually!(service.subscribed_users() == 0, "subscriptions released");
        let err = h
            .client
            .clone()
            .subscribe_notifications(Request::new(SubscribeNotificationsRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        h.stop().await;
    }
}

#[tokio::test]
async fn a_subscriber_hears_of_notifications_another_replica_created() {
    for mut h in harnesses("notif_replicas").await {
        // A second replica over the same database, without consumers of its own.
        let other = Notifications::with_db(h.service.db().clone())
            .await
            .unwrap();
        let other_client = NotificationServiceClient::new(Channel::from_service(
            NotificationServiceServer::new(other.clone()),
        ));
        let mut alice = subscribe(&other_client, "alice").await;
        h.start();
        h.comment("c1", "p1", "bob", "alice");
        assert_eq!(next_comment_id(&mut alice).await, "c1", "{}", h.name);
        assert_eq!(
            h.service.subscribed_users(),
            0,
            "the subscriber is on the other replica"
        );
        h.stop().await;
    }
}

#[tokio::test]
async fn closing_subscriptions_ends_the_streams() {
    for h in harnesses("notif_close").await {
        let mut alice = subscribe(&h.client, "alice").await;
        assert_eq!(h.service.subscribed_users(), 1);
        h.service.close_subscriptions();
        let end = tokio::time::timeout(Duration::from_secs(10), alice.next())
            .await
            .expect("the stream ends");
        assert!(
            end.is_none(),
            "{}: a clean end, not an error: {end:?}",
            h.name
        );
        assert_eq!(h.service.subscribed_users(), 0);
    }
}
