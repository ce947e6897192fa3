//! SubscribeNotifications under its bounds: per user, per replica, and a maximum lifetime.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tessera::notifications::v1::{
    SubscribeNotificationsRequest, SubscribeNotificationsResponse,
    notification_service_client::NotificationServiceClient,
    notification_service_server::NotificationServiceServer,
};
use tessera_client::Channel;
use tessera_mesh::auth::{EndUser, UserClaims};
use tessera_notifications::{MIGRATIONS, Notifications, SubscriptionLimits};
use tessera_store::testing::{self, TestDb};
use tonic::{Code, Request, Status, Streaming};

use crate::support::{as_user, eventually};

type Subscription = Streaming<SubscribeNotificationsResponse>;

/// One service per test database with these limits, and a client for it.
async fn services(
    label: &str,
    limits: SubscriptionLimits,
) -> Vec<(Notifications, NotificationServiceClient<Channel>, TestDb)> {
    let mut out = Vec::new();
    for db in testing::databases(label, MIGRATIONS).await {
        let service = Notifications::with_db_and_limits(db.db.clone(), limits)
            .await
            .unwrap();
        let client = NotificationServiceClient::new(Channel::from_service(
            NotificationServiceServer::new(service.clone()),
        ));
        out.push((service, client, db));
    }
    out
}

fn limits(per_user: usize, per_replica: usize, max_lifetime: Duration) -> SubscriptionLimits {
    SubscriptionLimits {
        per_user,
        per_replica,
        max_lifetime,
    }
}

async fn subscribe(
    client: &NotificationServiceClient<Channel>,
    user: &str,
) -> Result<Subscription, Status> {
    client
        .clone()
        .subscribe_notifications(as_user(user, "USER", SubscribeNotificationsRequest {}))
        .await
        .map(tonic::Response::into_inner)
}

/// The stream's next item, within a bound.
async fn next(stream: &mut Subscription) -> Option<Result<SubscribeNotificationsResponse, Status>> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream yields or ends within 10 s")
}

#[tokio::test]
async fn a_user_holds_at_most_the_per_user_limit() {
    for (service, client, db) in services(
        "notif_limit_user",
        limits(2, 100, Duration::from_secs(3600)),
    )
    .await
    {
        let first = subscribe(&client, "alice").await.unwrap();
        let _second = subscribe(&client, "alice").await.unwrap();
        let err = subscribe(&client, "alice").await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}: {err:?}", db.name);
        assert!(err.message().contains("close one"), "{err:?}");
        // Other users are not affected.
        let _bob = subscribe(&client, "bob").await.unwrap();
        assert_eq!(service.open_subscriptions(), 3);
        // Closing one gives its place back.
        drop(first);
        eventually!(
            service.open_subscriptions() == 2,
            "alice's closed stream is released"
        );
        let _third = subscribe(&client, "alice").await.unwrap();
    }
}

#[tokio::test]
async fn a_full_replica_answers_unavailable() {
    for (service, client, db) in services(
        "notif_limit_replica",
        limits(5, 3, Duration::from_secs(3600)),
    )
    .await
    {
        let mut open = Vec::new();
        for user in ["a1", "a2", "a3"] {
            open.push(subscribe(&client, user).await.unwrap());
        }
        let err = subscribe(&client, "a4").await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{}: {err:?}", db.name);
        assert_eq!(service.open_subscriptions(), 3);
        // Unary calls are not affected by a full replica.
        client
            .clone()
            .list_notifications(as_user("a4", "USER", Default::default()))
            .await
            .unwrap();
        open.pop();
        eventually!(service.open_subscriptions() == 2, "a place frees up");
        subscribe(&client, "a4").await.unwrap();
    }
}

#[tokio::test]
async fn a_stream_ends_at_its_lifetime_asking_the_client_to_resubscribe() {
    for (service, client, db) in services(
        "notif_limit_lifetime",
        limits(5, 100, Duration::from_secs(1)),
    )
    .await
    {
        let started = std::time::Instant::now();
        let mut stream = subscribe(&client, "alice").await.unwrap();
        let status = next(&mut stream)
            .await
            .expect("a status, not a silent end")
            .unwrap_err();
        println!(
            "{}: the stream ended after {:?}: {status:?}",
            db.name,
            started.elapsed()
        );
        assert_eq!(status.code(), Code::Unavailable, "retryable: {status:?}");
        assert!(status.message().contains("subscribe again"), "{status:?}");
        assert!(
            next(&mut stream).await.is_none(),
            "nothing after the status"
        );
        eventually!(
            service.open_subscriptions() == 0 && service.subscribed_users() == 0,
            "the place is given back"
        );
        // The client resubscribes.
        let _again = subscribe(&client, "alice").await.unwrap();
        assert_eq!(service.open_subscriptions(), 1);
    }
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    for (service, client, db) in services(
        "notif_limit_token",
        limits(5, 100, Duration::from_secs(3600)),
    )
    .await
    {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut request = Request::new(SubscribeNotificationsRequest {});
        request.extensions_mut().insert(EndUser {
            claims: UserClaims {
                sub: "alice".into(),
                role: "USER".into(),
                exp: now + 1,
                iat: now,
            },
            token: "short-lived".into(),
        });
        let mut stream = client
            .clone()
            .subscribe_notifications(request)
            .await
            .unwrap()
            .into_inner();
        let status = next(&mut stream).await.expect("a status").unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{}: {status:?}",
            db.name
        );
        assert!(status.message().contains("expired"), "{status:?}");
        eventually!(service.open_subscriptions() == 0, "the place is given back");
    }
}
