//! The NotificationService handlers and the SQL behind them.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use tessera::notifications::v1::{
    ListNotificationsRequest, ListNotificationsResponse, MarkNotificationsReadRequest,
    MarkNotificationsReadResponse, Notification, SubscribeNotificationsRequest,
    notification_service_server::NotificationService,
};
use tessera_mesh::{auth::end_user, errors::Violations};
use tessera_store::{Db, PageToken, timestamp};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{
    Error, MIGRATIONS,
    hub::{Hub, Subscription, fan_out},
    limits::{Admission, BoundedSubscription, SubscriptionLimits},
};

/// What a page token of ListNotifications is bound to: the caller and the unread filter.
fn page_scope(user_id: &str, unread_only: bool) -> String {
    format!("{user_id}\n{unread_only}")
}

/// Notifications per page when the request does not say.
pub const DEFAULT_PAGE_SIZE: i32 = 20;
/// The largest page; larger requests are capped to it.
pub const MAX_PAGE_SIZE: i32 = 100;
/// The most ids one MarkNotificationsRead may name.
pub const MAX_MARK_IDS: usize = 1000;
const MAX_ID_LEN: usize = 128;

/// `is_read` values (a BIGINT column: see [`crate::MIGRATIONS`]).
pub(crate) const READ: i64 = 1;
pub(crate) const UNREAD: i64 = 0;

type Result<T, E = Error> = std::result::Result<T, E>;

/// The notification service. Cheap to clone (shared state).
///
/// Opening it starts this replica's fan-out task (see the `hub` module), which ends when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Notifications {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    hub: Arc<Hub>,
    /// The open SubscribeNotifications streams, against their limits.
    admission: Arc<Admission>,
    /// Dropping it (with the last clone) stops the fan-out task.
    _stop: watch::Sender<()>,
}

const COLUMNS: &str = "notification_id, post_id, comment_id, actor_id, is_read, create_time";
/// `is_read` stays an `i64` here: sqlx's `Any` driver cannot decode a SQLite integer as `bool`.
type NotificationTuple = (String, String, String, String, i64, i64);

/// A stored notification as the API returns it. A function, not a `From` impl: both the tuple
/// and the generated `Notification` are foreign types.
fn notification_from_tuple(t: NotificationTuple) -> Notification {
    let (notification_id, post_id, comment_id, actor_id, is_read, create_time) = t;
    Notification {
        notification_id,
        post_id,
        comment_id,
        actor_id,
        read: is_read != UNREAD,
        create_time: Some(timestamp(create_time)),
    }
}

fn bad_id(id: &str) -> bool {
    id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control)
}

/// `$first, $first+1, ...`: `n` numbered placeholders.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn unread_count<'e, E>(executor: E, user_id: &str) -> Result<i64>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    Ok(
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM notifications WHERE user_id = $1 AND is_read = $2",
        )
        .bind(user_id)
        .bind(UNREAD)
        .fetch_one(executor)
        .await?,
    )
}

impl Notifications {
    /// Opens (creating and migrating) the database at `database` — a SQLite path or a
    /// `postgres://` URL — and starts the fan-out of live notifications.
    pub async fn open(database: &str) -> Result<Self> {
        let db = Db::open(database, MIGRATIONS).await?;
        Self::with_db(db).await
    }

    /// Like [`Notifications::open`] over an already connected database; runs [`MIGRATIONS`].
    pub async fn with_db(db: Db) -> Result<Self> {
        Self::with_db_and_limits(db, SubscriptionLimits::default()).await
    }

    /// Like [`Notifications::open`], with these bounds on SubscribeNotifications streams.
    pub async fn open_with_limits(database: &str, limits: SubscriptionLimits) -> Result<Self> {
        let db = Db::open(database, MIGRATIONS).await?;
        Self::with_db_and_limits(db, limits).await
    }

    /// Like [`Notifications::with_db`], with these bounds on SubscribeNotifications streams.
    pub async fn with_db_and_limits(db: Db, limits: SubscriptionLimits) -> Result<Self> {
        db.migrate(MIGRATIONS).await?;
        let hub = Arc::new(Hub::default());
        let (stop, stopped) = watch::channel(());
        // Live delivery starts from now: a subscriber gets what is created while it listens.
        let after = db.last_sequence().await?;
        tokio::spawn(fan_out(db.clone(), Arc::clone(&hub), after, stopped));
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                hub,
                admission: Arc::new(Admission::new(limits)),
                _stop: stop,
            }),
        })
    }

    /// The database, for consumers and tests.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Users with an open SubscribeNotifications stream on this replica.
    pub fn subscribed_users(&self) -> usize {
        self.inner.hub.len()
    }

    /// Open SubscribeNotifications streams on this replica.
    pub fn open_subscriptions(&self) -> usize {
        self.inner.admission.total()
    }

    /// Ends every open SubscribeNotifications stream on this replica (their clients see a
    /// clean end of stream and may resubscribe elsewhere). Call it when draining, so
    /// long-lived streams do not hold up a graceful shutdown.
    pub fn close_subscriptions(&self) {
        self.inner.hub.close_all();
    }

    /// A live stream of `user_id`'s new notifications. Not counted against the
    /// [`SubscriptionLimits`]: those apply to SubscribeNotifications calls.
    /// Live from now: what was created before the call is not replayed on it.
    pub async fn subscribe(&self, user_id: &str) -> Result<Subscription> {
        let after = self.inner.db.last_sequence().await?;
        Ok(self.inner.hub.subscribe(user_id, after))
    }

    async fn list(
        &self,
        user_id: &str,
        req: ListNotificationsRequest,
    ) -> Result<ListNotificationsResponse> {
        let mut v = Violations::new();
        v.check(req.page_size < 0, "page_size", "must not be negative");
        let size = i64::from(match req.page_size {
            n if n <= 0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        });
        let after = PageToken::decode(&req.page_token, &page_scope(user_id, req.unread_only))
            .unwrap_or_else(|bad| {
                v.add("page_token", bad.reason());
                None
            });
        v.into_result().map_err(Error::Invalid)?;

        // Newest first; (create_time, notification_id) is a total order.
        let (before_time, before_id) = after
            .map(|t| (t.create_time, t.id))
            .unwrap_or((i64::MAX, String::new()));
        let unread_filter = if req.unread_only {
            "AND is_read = $5"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM notifications WHERE user_id = $1 \
             AND (create_time < $2 OR (create_time = $2 AND notification_id < $3)) {unread_filter} \
             ORDER BY create_time DESC, notification_id DESC LIMIT $4"
        );
        let mut query = sqlx::query_as::<_, NotificationTuple>(&sql)
            .bind(user_id)
            .bind(before_time)
            .bind(&before_id)
            .bind(size + 1);
        if req.unread_only {
            query = query.bind(UNREAD);
        }
        let rows = query.fetch_all(self.db().pool()).await?;
        let fetched = rows.len();
        let take = usize::try_from(size).unwrap_or(0);
        let mut notifications = Vec::with_capacity(fetched.min(take));
        let mut last_time = 0;
        for row in rows.into_iter().take(take) {
            last_time = row.5;
            notifications.push(notification_from_tuple(row));
        }
        let next_page_token = match notifications.last() {
            Some(last) if fetched > notifications.len() => PageToken::new(
                page_scope(user_id, req.unread_only),
                last_time,
                last.notification_id.clone(),
            )
            .encode(),
            _ => String::new(),
        };
        Ok(ListNotificationsResponse {
            notifications,
            next_page_token,
            unread_count: unread_count(self.db().pool(), user_id).await?,
        })
    }

    async fn mark_read(&self, user_id: &str, req: MarkNotificationsReadRequest) -> Result<i64> {
        let mut v = Violations::new();
        v.check(
            req.notification_ids.len() > MAX_MARK_IDS,
            "notification_ids",
            "names too many notifications (at most 1000)",
        );
        v.check(
            req.notification_ids.iter().any(|id| bad_id(id)),
            "notification_ids",
            "must hold non-empty ids of at most 128 bytes without control characters",
        );
        v.into_result().map_err(Error::Invalid)?;

        let mut tx = self.db().begin().await?;
        if req.notification_ids.is_empty() {
            sqlx::query(
                "UPDATE notifications SET is_read = $2 WHERE user_id = $1 AND is_read = $3",
            )
            .bind(user_id)
            .bind(READ)
            .bind(UNREAD)
            .execute(&mut *tx)
            .await?;
        } else {
            let mut seen = HashSet::new();
            let ids: Vec<&str> = req
                .notification_ids
                .iter()
                .map(String::as_str)
                .filter(|id| seen.insert(*id))
                .collect();
            let list = placeholders(1, ids.len());
            let sql = format!(
                "SELECT notification_id, user_id FROM notifications WHERE notification_id IN ({list})"
            );
            let mut query = sqlx::query_as::<_, (String, String)>(&sql);
            for id in &ids {
                query = query.bind(*id);
            }
            let owners: HashMap<String, String> =
                query.fetch_all(&mut *tx).await?.into_iter().collect();
            for id in &ids {
                match owners.get(*id) {
                    None => return Err(Error::NotFound(format!("notification {id}"))),
                    Some(owner) if owner != user_id => {
                        return Err(Error::PermissionDenied(format!(
                            "notification {id} is not yours"
                        )));
                    }
                    Some(_) => {}
                }
            }
            let list = placeholders(3, ids.len());
            let sql = format!(
                "UPDATE notifications SET is_read = $2 WHERE user_id = $1 AND notification_id IN ({list})"
            );
            let mut update = sqlx::query(&sql).bind(user_id).bind(READ);
            for id in &ids {
                update = update.bind(*id);
            }
            update.execute(&mut *tx).await?;
        }
        let count = unread_count(&mut *tx, user_id).await?;
        tx.commit().await?;
        Ok(count)
    }
}

#[tonic::async_trait]
impl NotificationService for Notifications {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        let user_id = end_user(&request)?.claims.sub.clone();
        Ok(Response::new(
            self.list(&user_id, request.into_inner()).await?,
        ))
    }

    async fn mark_notifications_read(
        &self,
        request: Request<MarkNotificationsReadRequest>,
    ) -> Result<Response<MarkNotificationsReadResponse>, Status> {
        let user_id = end_user(&request)?.claims.sub.clone();
        let unread_count = self.mark_read(&user_id, request.into_inner()).await?;
        Ok(Response::new(MarkNotificationsReadResponse {
            unread_count,
        }))
    }

    type SubscribeNotificationsStream = BoundedSubscription;

    async fn subscribe_notifications(
        &self,
        request: Request<SubscribeNotificationsRequest>,
    ) -> Result<Response<Self::SubscribeNotificationsStream>, Status> {
        let claims = &end_user(&request)?.claims;
        // Counted before the hub is joined, so a refused call leaves nothing behind.
        let ticket = self.inner.admission.admit(&claims.sub)?;
        let stream = self.subscribe(&claims.sub).await?;
        Ok(Response::new(
            self.inner.admission.bound(stream, ticket, claims.exp),
        ))
    }
}
