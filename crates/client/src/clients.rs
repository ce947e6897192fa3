//! [`Clients`]: one typed client per Tessera service.

use tessera::{
    comments::v1::comment_service_client::CommentServiceClient,
    notifications::v1::notification_service_client::NotificationServiceClient,
    posts::v1::post_service_client::PostServiceClient,
    users::v1::user_service_client::UserServiceClient,
};

use crate::{Channel, Error};

/// Where each service is, as target strings (see [`crate::ClientBuilder::channel`]). Leave out
/// the services you do not call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// `tessera.users.v1.UserService`.
    pub users: Option<String>,
    /// `tessera.posts.v1.PostService`.
    pub posts: Option<String>,
    /// `tessera.comments.v1.CommentService`.
    pub comments: Option<String>,
    /// `tessera.notifications.v1.NotificationService`.
    pub notifications: Option<String>,
}

/// Typed clients for Tessera's services, cheap to clone and to call from many tasks. A
/// service given no target answers every call with FAILED_PRECONDITION.
///
/// ```
/// use tessera::notifications::v1::ListNotificationsRequest;
/// use tessera_client::Clients;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // A workload that was given no NotificationService target.
/// let clients = Clients::from_channels(None, None, None, None);
/// let status = clients
///     .notifications()
///     .list_notifications(ListNotificationsRequest::default())
///     .await
///     .unwrap_err();
/// assert_eq!(status.code(), tonic::Code::FailedPrecondition);
/// # }
/// ```
#[derive(Clone)]
pub struct Clients {
    users: Channel,
    posts: Channel,
    comments: Channel,
    notifications: Channel,
}

impl Clients {
    /// Clients over the given channels (e.g. [`Channel::from_service`] in tests); the
    /// example on [`Clients`] leaves one out.
    pub fn from_channels(
        users: Option<Channel>,
        posts: Option<Channel>,
        comments: Option<Channel>,
        notifications: Option<Channel>,
    ) -> Self {
        let or_missing = |channel: Option<Channel>, name| {
            channel.unwrap_or_else(|| Channel::failing(Error::NoTarget(name)))
        };
        Self {
            users: or_missing(users, "tessera.users.v1.UserService"),
            posts: or_missing(posts, "tessera.posts.v1.PostService"),
            comments: or_missing(comments, "tessera.comments.v1.CommentService"),
            notifications: or_missing(
                notifications,
                "tessera.notifications.v1.NotificationService",
            ),
        }
    }

    /// `tessera.users.v1.UserService`.
    pub fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.users.clone())
    }

    /// `tessera.posts.v1.PostService`.
    ///
    /// ```
    /// use tessera::posts::v1::GetPostRequest;
    /// use tessera_client::Clients;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut posts = Clients::from_channels(None, None, None, None).posts();
    /// let status = posts.get_post(GetPostRequest::default()).await.unwrap_err();
    /// assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    /// assert!(status.message().contains("tessera.posts.v1.PostService"));
    /// # }
    /// ```
    pub fn posts(&self) -> PostServiceClient<Channel> {
        PostServiceClient::new(self.posts.clone())
    }

    /// `tessera.comments.v1.CommentService`.
    pub fn comments(&self) -> CommentServiceClient<Channel> {
        CommentServiceClient::new(self.comments.clone())
    }

    /// `tessera.notifications.v1.NotificationService`.
    pub fn notifications(&self) -> NotificationServiceClient<Channel> {
        NotificationServiceClient::new(self.notifications.clone())
    }

    /// The channel under the typed client of `service` (`"users"`, `"posts"`, `"comments"`,
    /// `"notifications"`), for calls made without one: the event consumers' `WatchEvents`
    /// (`tessera_store::follow`). Another name gets a channel that fails every call.
    pub fn channel(&self, service: &str) -> Channel {
        match service {
            "users" => self.users.clone(),
            "posts" => self.posts.clone(),
            "comments" => self.comments.clone(),
            "notifications" => self.notifications.clone(),
            _ => Channel::failing(Error::NoTarget("an unknown service")),
        }
    }
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients").finish_non_exhaustive()
    }
}
