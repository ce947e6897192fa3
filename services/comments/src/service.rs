//! The CommentService handlers and the SQL behind them.

use tessera::{
    comments::v1::{
        Comment, CommentCreated, CommentDeleted, CreateCommentRequest, CreateCommentResponse,
        DeleteCommentRequest, DeleteCommentResponse, ListCommentsRequest, ListCommentsResponse,
        WatchEventsRequest, WatchEventsResponse, comment_service_server::CommentService,
        watch_events_response::Event,
    },
    posts::v1::{GetPostRequest, post_service_client::PostServiceClient},
    users::v1::user_service_client::UserServiceClient,
};
use tessera_client::Channel;
use tessera_mesh::{auth::end_user, errors::Violations};
use tessera_store::{Db, PageToken, Tx, now_micros, outbox, timestamp};
use tonic::{Request, Response, Status};

use crate::{
    Error, MIGRATIONS,
    consumers::{POST_KEY, USER_KEY},
};

// The events this service appends to its outbox and serves from WatchEvents.
tessera_store::watch_events!(CommentEvents = tessera::comments::v1);

/// Longest comment body, in characters.
pub const MAX_BODY_CHARS: usize = 10_000;
/// Comments per page when the request does not say.
pub const DEFAULT_PAGE_SIZE: i32 = 20;
/// The largest page; larger requests are capped to it.
pub const MAX_PAGE_SIZE: i32 = 100;
/// Longest id accepted in a request (post, comment and request ids).
const MAX_ID_LEN: usize = 128;

/// The comment service: its database and the posts client it checks posts with.
#[derive(Clone)]
pub struct Comments {
    pub(crate) db: Db,
    posts: PostServiceClient<Channel>,
    /// Where a moderator's current role is confirmed; without it, nobody acts as one.
    users: Option<UserServiceClient<Channel>>,
}

type Result<T, E = Error> = std::result::Result<T, E>;

const COLUMNS: &str = "comment_id, post_id, author_id, body, create_time";
type CommentTuple = (String, String, String, String, i64);

/// A stored comment as the API returns it. A function, not a `From` impl: both the tuple and
/// the generated `Comment` are foreign types.
fn comment_from_tuple(t: CommentTuple) -> Comment {
    let (comment_id, post_id, author_id, body, create_time) = t;
    Comment {
        comment_id,
        post_id,
        author_id,
        body,
        create_time: Some(timestamp(create_time)),
    }
}

/// Checks an id-like field: present (if `required`), short, without control characters
/// (PostgreSQL cannot store NUL in TEXT).
fn check_id(v: &mut Violations, value: &str, field: &str, required: bool) {
    if value.is_empty() {
        v.check(required, field, "must not be empty");
    } else if value.len() > MAX_ID_LEN {
        v.add(field, format!("must be at most {MAX_ID_LEN} bytes"));
    } else if value.chars().any(char::is_control) {
        v.add(field, "must not contain control characters");
    }
}

/// 0 means the default; above the maximum is capped; negative is an error.
fn page_size(v: &mut Violations, size: i32) -> i64 {
    v.check(size < 0, "page_size", "must not be negative");
    i64::from(match size {
        n if n <= 0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    })
}

impl Comments {
    /// Opens (creating and migrating) the database at `database` — a SQLite path or a
    /// `postgres://` URL — and serves over it, checking posts with `posts`.
    pub async fn open(database: &str, posts: PostServiceClient<Channel>) -> Result<Self> {
        let db = Db::open(database, MIGRATIONS).await?;
        Self::with_db(db, posts).await
    }

    /// Like [`Comments::open`] over an already connected database; runs [`MIGRATIONS`].
    pub async fn with_db(db: Db, posts: PostServiceClient<Channel>) -> Result<Self> {
        db.migrate(MIGRATIONS).await?;
        Ok(Self {
            db,
            posts,
            users: None,
        })
    }

    /// Confirms moderator rights with `users` (UserService.GetUser on the caller) before a
    /// moderator deletes someone else's comment: the token's role may be minutes old.
    /// Without this, only the comment's and the post's authors may delete it.
    pub fn with_users(mut self, users: UserServiceClient<Channel>) -> Self {
        self.users = Some(users);
        self
    }

    /// The database, for consumers and tests.
    pub fn db(&self) -> &Db {
        &self.db
    }

    async fn create(&self, author: &str, req: CreateCommentRequest) -> Result<Comment> {
        let mut v = Violations::new();
        check_id(&mut v, &req.post_id, "post_id", true);
        check_id(&mut v, &req.request_id, "request_id", false);
        let chars = req.body.chars().count();
        if req.body.trim().is_empty() {
            v.add("body", "must not be empty");
        } else if chars > MAX_BODY_CHARS {
            v.add(
                "body",
                format!("must be at most {MAX_BODY_CHARS} characters"),
            );
        } else if req.body.contains('\0') {
            v.add("body", "must not contain NUL characters");
        }
        v.into_result().map_err(Error::Invalid)?;

        let request_id = (!req.request_id.is_empty()).then_some(req.request_id.as_str());
        if let Some(rid) = request_id
            && let Some(first) = self.by_request(author, rid).await?
        {
            return Ok(first);
        }

        let post = self
            .posts
            .clone()
            .get_post(GetPostRequest {
                post_id: req.post_id.clone(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => Error::NotFound(format!("post {}", req.post_id)),
                _ => Error::Upstream(s),
            })?
            .into_inner()
            .post
            .ok_or_else(|| Error::NotFound(format!("post {}", req.post_id)))?;

        let comment = Comment {
            comment_id: uuid::Uuid::now_v7().to_string(),
            post_id: req.post_id,
            author_id: author.to_owned(),
            body: req.body,
            create_time: None,
        };
        match self.insert(&comment, &post.author_id, request_id).await {
            Err(Error::Store(e)) if e.is_unique_violation() => {
                // A concurrent retry with the same request_id won: return its comment.
                match request_id {
                    Some(rid) => self.by_request(author, rid).await?.ok_or(Error::Store(e)),
                    None => Err(Error::Store(e)),
                }
            }
            other => other,
        }
    }

    /// Inserts the comment and its CommentCreated event in one transaction.
    async fn insert(
        &self,
        comment: &Comment,
        post_author_id: &str,
        request_id: Option<&str>,
    ) -> Result<Comment> {
        let now = now_micros();
        let mut tx = self.db.begin().await?;
        // The post may have been deleted, or the user, since their events were applied:
        // the tombstones close that race (the GetPost above saw an older state). The key
        // locks close the next one: a cascade writing the tombstone after the check below
        // waits for this insert to commit, so its DELETE sees the comment (PostgreSQL READ
        // COMMITTED; see `Tx::lock_key`).
        tx.lock_key_shared(POST_KEY, &comment.post_id).await?;
        tx.lock_key_shared(USER_KEY, &comment.author_id).await?;
        let gone_post: Option<String> =
            sqlx::query_scalar("SELECT post_id FROM deleted_posts WHERE post_id = $1")
                .bind(&comment.post_id)
                .fetch_optional(&mut *tx)
                .await?;
        if gone_post.is_some() {
            return Err(Error::NotFound(format!("post {}", comment.post_id)));
        }
        let gone_user: Option<String> =
            sqlx::query_scalar("SELECT user_id FROM deleted_users WHERE user_id = $1")
                .bind(&comment.author_id)
                .fetch_optional(&mut *tx)
                .await?;
        if gone_user.is_some() {
            return Err(Error::UserGone);
        }
        sqlx::query(
            "INSERT INTO comments \
             (comment_id, post_id, author_id, post_author_id, body, create_time, request_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&comment.comment_id)
        .bind(&comment.post_id)
        .bind(&comment.author_id)
        .bind(post_author_id)
        .bind(&comment.body)
        .bind(now)
        .bind(request_id)
        .execute(&mut *tx)
        .await?;
        let stored = Comment {
            create_time: Some(timestamp(now)),
            ..comment.clone()
        };
        append(
            &mut tx,
            Event::CommentCreated(CommentCreated {
                comment: Some(stored.clone()),
                post_author_id: post_author_id.to_owned(),
            }),
        );
        tx.commit().await?;
        Ok(stored)
    }

    async fn by_request(&self, author: &str, request_id: &str) -> Result<Option<Comment>> {
        let row: Option<CommentTuple> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM comments WHERE author_id = $1 AND request_id = $2"
        ))
        .bind(author)
        .bind(request_id)
        .fetch_optional(self.db.pool())
        .await?;
        Ok(row.map(comment_from_tuple))
    }

    async fn list(&self, req: ListCommentsRequest) -> Result<ListCommentsResponse> {
        let mut v = Violations::new();
        check_id(&mut v, &req.post_id, "post_id", true);
        let size = page_size(&mut v, req.page_size);
        let after = PageToken::decode(&req.page_token, &req.post_id).unwrap_or_else(|bad| {
            v.add("page_token", bad.reason());
            None
        });
        v.into_result().map_err(Error::Invalid)?;

        // Oldest first; (create_time, comment_id) is a total order, so a page boundary
        // between two comments of the same microsecond is still exact.
        let (after_time, after_id) = after
            .map(|t| (t.create_time, t.id))
            .unwrap_or((i64::MIN, String::new()));
        let rows: Vec<CommentTuple> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM comments WHERE post_id = $1 \
             AND (create_time > $2 OR (create_time = $2 AND comment_id > $3)) \
             ORDER BY create_time, comment_id LIMIT $4"
        ))
        .bind(&req.post_id)
        .bind(after_time)
        .bind(after_id)
        .bind(size + 1)
        .fetch_all(self.db.pool())
        .await?;
        let fetched = rows.len();
        let mut comments = Vec::with_capacity(fetched);
        let mut last_time = 0;
        for row in rows.into_iter().take(usize::try_from(size).unwrap_or(0)) {
            last_time = row.4;
            comments.push(comment_from_tuple(row));
        }
        let next_page_token = match comments.last() {
            Some(last) if fetched > comments.len() => {
                PageToken::new(req.post_id, last_time, last.comment_id.clone()).encode()
            }
            _ => String::new(),
        };
        Ok(ListCommentsResponse {
            comments,
            next_page_token,
        })
    }

    async fn delete(
        &self,
        caller: &tessera_mesh::auth::UserClaims,
        req: DeleteCommentRequest,
    ) -> Result<()> {
        let mut v = Violations::new();
        check_id(&mut v, &req.comment_id, "comment_id", true);
        v.into_result().map_err(Error::Invalid)?;

        // Confirmed against the stored role (the token's may be stale), before the
        // transaction so no write lock is held across a network call; only asked when the
        // token claims it.
        let moderator = match (&self.users, caller.is_moderator()) {
            (Some(users), true) => tessera_client::roles::is_moderator_now(users, &caller.sub)
                .await
                .map_err(Error::Upstream)?,
            _ => false,
        };
        let mut tx = self.db.begin().await?;
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT post_id, author_id, post_author_id FROM comments WHERE comment_id = $1",
        )
        .bind(&req.comment_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (post_id, author_id, post_author_id) =
            row.ok_or_else(|| Error::NotFound(format!("comment {}", req.comment_id)))?;
        let allowed = caller.sub == author_id || caller.sub == post_author_id || moderator;
        if !allowed {
            return Err(Error::PermissionDenied(
                "only the comment's author, the post's author, a moderator or an admin may delete it",
            ));
        }
        let deleted = sqlx::query("DELETE FROM comments WHERE comment_id = $1")
            .bind(&req.comment_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            // A concurrent delete got there first (PostgreSQL, READ COMMITTED): it emitted
            // the event.
            return Err(Error::NotFound(format!("comment {}", req.comment_id)));
        }
        append(
            &mut tx,
            Event::CommentDeleted(CommentDeleted {
                comment_id: req.comment_id,
                post_id,
            }),
        );
        tx.commit().await?;
        Ok(())
    }
}

/// Appends one event to the outbox when `tx` commits.
pub(crate) fn append(tx: &mut Tx, event: Event) {
    outbox::append_on_commit::<CommentEvents>(tx, event);
}

#[tonic::async_trait]
impl CommentService for Comments {
    async fn create_comment(
        &self,
        request: Request<CreateCommentRequest>,
    ) -> Result<Response<CreateCommentResponse>, Status> {
        let author = end_user(&request)?.claims.sub.clone();
        let comment = self.create(&author, request.into_inner()).await?;
        Ok(Response::new(CreateCommentResponse {
            comment: Some(comment),
        }))
    }

    async fn list_comments(
        &self,
        request: Request<ListCommentsRequest>,
    ) -> Result<Response<ListCommentsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn delete_comment(
        &self,
        request: Request<DeleteCommentRequest>,
    ) -> Result<Response<DeleteCommentResponse>, Status> {
        let caller = end_user(&request)?.claims.clone();
        self.delete(&caller, request.into_inner()).await?;
        Ok(Response::new(DeleteCommentResponse {}))
    }

    type WatchEventsStream = outbox::WatchStream<WatchEventsResponse>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(outbox::stream::<CommentEvents>(
            &self.db,
            req.after_sequence,
            &req.event_fields,
        )?))
    }
}
