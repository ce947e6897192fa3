//! The PostService implementation ([`Posts`]): its handlers and the post storage they share
//! with the consumer.

use std::sync::Arc;

use tessera::posts::v1::{
    CreatePostRequest, CreatePostResponse, DeletePostRequest, DeletePostResponse, GetPostRequest,
    GetPostResponse, ListPostsRequest, ListPostsResponse, Post, PostCreated, PostDeleted,
    PostUpdated, UpdatePostRequest, UpdatePostResponse, WatchEventsRequest, WatchEventsResponse,
    post_service_server::PostService, watch_events_response::Event,
};
use tessera::users::v1::user_service_client::UserServiceClient;
use tessera_client::Channel;
use tessera_mesh::{
    auth::{UserClaims, end_user},
    errors::{Violations, invalid_field},
};
use tessera_store::{Db, PageToken, Tx, now_micros, outbox, timestamp};
use tonic::{Request, Response, Status};

use crate::{Error, MIGRATIONS};

/// The PostService implementation. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Posts {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    /// Where a moderator's current role is confirmed; without it, nobody acts as one.
    users: Option<UserServiceClient<Channel>>,
}

impl Posts {
    /// Opens (creating and migrating if needed) the database at `target`: a SQLite path or a
    /// `postgres://` URL.
    pub async fn open(target: &str) -> Result<Posts, Error> {
        let db = Db::open(target, MIGRATIONS).await?;
        Ok(Self::from_migrated(db))
    }

    /// Like [`Posts::open`] over an already connected database; runs [`MIGRATIONS`].
    pub async fn with_db(db: Db) -> Result<Posts, Error> {
        db.migrate(MIGRATIONS).await?;
        Ok(Self::from_migrated(db))
    }

    fn from_migrated(db: Db) -> Posts {
        Posts {
            inner: Arc::new(Inner { db, users: None }),
        }
    }

    /// Confirms moderator rights with `users` (UserService.GetUser on the caller) before a
    /// moderator edits or deletes someone else's post: the token's role may be stale.
    /// Without this, only authors may edit or delete their posts.
    pub fn with_users(self, users: UserServiceClient<Channel>) -> Posts {
        Posts {
            inner: Arc::new(Inner {
                db: self.inner.db.clone(),
                users: Some(users),
            }),
        }
    }

    /// The service's database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }
}

// The events this service appends to its outbox and serves from WatchEvents.
tessera_store::watch_events!(PostEvents = tessera::posts::v1);

const MAX_TITLE: usize = 200;
/// Bytes.
const MAX_BODY: usize = 64 * 1024;
const MAX_TAGS: usize = 10;
const MAX_TAG: usize = 32;
const MAX_REQUEST_ID: usize = 128;
const DEFAULT_PAGE_SIZE: i64 = 20;
const MAX_PAGE_SIZE: i64 = 100;

pub(crate) const POST_COLUMNS: &str =
    "post_id, author_id, title, body, tags, create_time, update_time, etag";
type PostTuple = (String, String, String, String, String, i64, i64, String);

/// A stored post.
pub(crate) struct PostRow {
    pub(crate) post_id: String,
    pub(crate) author_id: String,
    title: String,
    body: String,
    tags: Vec<String>,
    create_time: i64,
    update_time: i64,
    etag: String,
}

impl TryFrom<PostTuple> for PostRow {
    type Error = Error;
    fn try_from(t: PostTuple) -> Result<Self, Error> {
        let (post_id, author_id, title, body, tags, create_time, update_time, etag) = t;
        let tags = serde_json::from_str(&tags)
            .map_err(|e| Error::Corrupt(format!("tags of post {post_id}: {e}")))?;
        Ok(Self {
            post_id,
            author_id,
            title,
            body,
            tags,
            create_time,
            update_time,
            etag,
        })
    }
}

impl PostRow {
    fn to_proto(&self) -> Post {
        Post {
            post_id: self.post_id.clone(),
            author_id: self.author_id.clone(),
            title: self.title.clone(),
            body: self.body.clone(),
            tags: self.tags.clone(),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: self.etag.clone(),
        }
    }
}

fn new_etag() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn tags_json(tags: &[String]) -> String {
    // Serializing a list of strings cannot fail.
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".into())
}

fn check_title(v: &mut Violations, field: &str, title: &str) {
    v.check(title.trim().is_empty(), field, "is required");
    v.check(
        title.chars().count() > MAX_TITLE,
        field,
        "must be at most 200 characters",
    );
    v.check(
        title.chars().any(char::is_control),
        field,
        "must not contain control characters",
    );
}

fn check_body(v: &mut Violations, field: &str, body: &str) {
    v.check(body.len() > MAX_BODY, field, "must be at most 64 KiB");
}

fn check_tags(v: &mut Violations, field: &str, tags: &[String]) {
    v.check(tags.len() > MAX_TAGS, field, "at most 10 tags");
    for (i, tag) in tags.iter().enumerate() {
        let n = tag.chars().count();
        v.check(
            n == 0 || n > MAX_TAG || tag.chars().any(char::is_control),
            &format!("{field}[{i}]"),
            "must be 1 to 32 characters, no control characters",
        );
    }
}

fn required(value: &str, field: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid_field(field, "is required"));
    }
    Ok(())
}

impl Posts {
    /// A moderator's authority, confirmed against the stored role (the token's may be
    /// minutes old). Only asked when the token claims it, so authors cost no extra call.
    async fn is_moderator_now(&self, caller: &UserClaims) -> Result<bool, Status> {
        if !caller.is_moderator() {
            return Ok(false);
        }
        match &self.inner.users {
            Some(users) => tessera_client::roles::is_moderator_now(users, &caller.sub).await,
            None => Ok(false),
        }
    }
}

/// Appends a WatchEvents payload (only the oneof set; sequence and time come from the outbox)
/// when `tx` commits.
pub(crate) fn append(tx: &mut Tx, event: Event) {
    outbox::append_on_commit::<PostEvents>(tx, event);
}

/// Deletes a post with its request-id records and appends PostDeleted, inside `tx`.
/// Returns whether the post existed.
async fn delete_post_in(tx: &mut Tx, post_id: &str, author_id: &str) -> Result<bool, Error> {
    let deleted = sqlx::query("DELETE FROM posts WHERE post_id = $1")
        .bind(post_id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Ok(false);
    }
    sqlx::query("DELETE FROM create_requests WHERE post_id = $1")
        .bind(post_id)
        .execute(&mut **tx)
        .await?;
    append(tx, post_deleted(post_id, author_id));
    Ok(true)
}

pub(crate) fn post_deleted(post_id: &str, author_id: &str) -> Event {
    Event::PostDeleted(PostDeleted {
        post_id: post_id.to_owned(),
        author_id: author_id.to_owned(),
    })
}

impl Posts {
    async fn find_post(&self, post_id: &str) -> Result<Option<PostRow>, Error> {
        let row: Option<PostTuple> = sqlx::query_as(&format!(
            "SELECT {POST_COLUMNS} FROM posts WHERE post_id = $1"
        ))
        .bind(post_id)
        .fetch_optional(self.db().pool())
        .await?;
        row.map(PostRow::try_from).transpose()
    }

    /// The post an earlier CreatePost by this author with this request id created.
    async fn find_by_request(
        &self,
        author_id: &str,
        request_id: &str,
    ) -> Result<Option<PostRow>, Error> {
        let row: Option<PostTuple> = sqlx::query_as(&format!(
            "SELECT {POST_COLUMNS} FROM posts WHERE post_id = \
             (SELECT post_id FROM create_requests WHERE author_id = $1 AND request_id = $2)"
        ))
        .bind(author_id)
        .bind(request_id)
        .fetch_optional(self.db().pool())
        .await?;
        row.map(PostRow::try_from).transpose()
    }

    async fn insert_post(&self, post: &PostRow, request_id: &str) -> Result<(), Error> {
        let mut tx = self.db().begin().await?;
        // A UserDeleted cascade writing the tombstone after the check below waits for this
        // insert to commit, so its DELETE sees the post (PostgreSQL READ COMMITTED; see
        // `Tx::lock_key`).
        tx.lock_key_shared(crate::consumers::AUTHOR_KEY, &post.author_id)
            .await?;
        // The author's tombstone is checked in the INSERT itself: one statement fewer, each
        // a round trip to the SQLite connection's thread.
        let inserted = sqlx::query(&format!(
            "INSERT INTO posts ({POST_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
             WHERE NOT EXISTS (SELECT 1 FROM deleted_authors WHERE author_id = $2)"
        ))
        .bind(&post.post_id)
        .bind(&post.author_id)
        .bind(&post.title)
        .bind(&post.body)
        .bind(tags_json(&post.tags))
        .bind(post.create_time)
        .bind(post.update_time)
        .bind(&post.etag)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(Error::AuthorDeleted);
        }
        if !request_id.is_empty() {
            sqlx::query(
                "INSERT INTO create_requests (author_id, request_id, post_id) VALUES ($1, $2, $3)",
            )
            .bind(&post.author_id)
            .bind(request_id)
            .bind(&post.post_id)
            .execute(&mut *tx)
            .await?;
        }
        append(
            &mut tx,
            Event::PostCreated(PostCreated {
                post: Some(post.to_proto()),
            }),
        );
        tx.commit().await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl PostService for Posts {
    async fn create_post(
        &self,
        request: Request<CreatePostRequest>,
    ) -> Result<Response<CreatePostResponse>, Status> {
        let author_id = end_user(&request)?.claims.sub.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        check_title(&mut v, "title", &req.title);
        check_body(&mut v, "body", &req.body);
        check_tags(&mut v, "tags", &req.tags);
        v.check(
            req.request_id.len() > MAX_REQUEST_ID,
            "request_id",
            "must be at most 128 bytes",
        );
        v.into_result()?;

        if !req.request_id.is_empty()
            && let Some(first) = self.find_by_request(&author_id, &req.request_id).await?
        {
            return Ok(Response::new(CreatePostResponse {
                post: Some(first.to_proto()),
            }));
        }
        let now = now_micros();
        let post = PostRow {
            post_id: uuid::Uuid::now_v7().to_string(),
            author_id,
            title: req.title,
            body: req.body,
            tags: req.tags,
            create_time: now,
            update_time: now,
            etag: new_etag(),
        };
        match self.insert_post(&post, &req.request_id).await {
            Ok(()) => Ok(Response::new(CreatePostResponse {
                post: Some(post.to_proto()),
            })),
            Err(Error::Store(e)) if e.is_unique_violation() && !req.request_id.is_empty() => {
                // A concurrent retry with the same request id won the race: return its post.
                let first = self
                    .find_by_request(&post.author_id, &req.request_id)
                    .await?
                    .ok_or(Error::Store(e))?;
                Ok(Response::new(CreatePostResponse {
                    post: Some(first.to_proto()),
                }))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn get_post(
        &self,
        request: Request<GetPostRequest>,
    ) -> Result<Response<GetPostResponse>, Status> {
        let req = request.into_inner();
        required(&req.post_id, "post_id")?;
        let post = self.find_post(&req.post_id).await?.ok_or(Error::NotFound)?;
        Ok(Response::new(GetPostResponse {
            post: Some(post.to_proto()),
        }))
    }

    async fn list_posts(
        &self,
        request: Request<ListPostsRequest>,
    ) -> Result<Response<ListPostsResponse>, Status> {
        let req = request.into_inner();
        let page_size = match i64::from(req.page_size) {
            n if n < 0 => return Err(invalid_field("page_size", "must not be negative")),
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        // A token only fits the author filter it was issued for.
        let after = PageToken::decode(&req.page_token, &req.author_id)?;

        // Newest first; keyset on (create_time, post_id) so concurrent inserts never shift
        // a page boundary.
        let mut sql = format!("SELECT {POST_COLUMNS} FROM posts WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if !req.author_id.is_empty() {
            sql.push_str(&format!(" AND author_id = {}", next()));
        }
        if after.is_some() {
            let (t, id) = (next(), next());
            sql.push_str(&format!(
                " AND (create_time < {t} OR (create_time = {t} AND post_id < {id}))"
            ));
        }
        sql.push_str(&format!(
            " ORDER BY create_time DESC, post_id DESC LIMIT {}",
            next()
        ));
        let mut query = sqlx::query_as::<_, PostTuple>(&sql);
        if !req.author_id.is_empty() {
            query = query.bind(&req.author_id);
        }
        if let Some(token) = &after {
            query = query.bind(token.create_time).bind(&token.id);
        }
        let mut rows = query
            .bind(page_size + 1)
            .fetch_all(self.db().pool())
            .await
            .map_err(Error::from)?;
        let more = rows.len() as i64 > page_size;
        rows.truncate(page_size as usize);
        let posts = rows
            .into_iter()
            .map(PostRow::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let next_page_token = match posts.last() {
            Some(last) if more => PageToken::new(
                req.author_id.clone(),
                last.create_time,
                last.post_id.clone(),
            )
            .encode(),
            _ => String::new(),
        };
        Ok(Response::new(ListPostsResponse {
            posts: posts.iter().map(PostRow::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_post(
        &self,
        request: Request<UpdatePostRequest>,
    ) -> Result<Response<UpdatePostResponse>, Status> {
        let caller = end_user(&request)?.claims.clone();
        let req = request.into_inner();
        let Some(patch) = req.post else {
            return Err(invalid_field("post", "is required"));
        };
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let all = paths.is_empty();
        let (mut title, mut body, mut tags) = (all, all, all);
        let mut v = Violations::new();
        v.check(patch.post_id.is_empty(), "post.post_id", "is required");
        v.check(req.etag.is_empty(), "etag", "is required");
        for path in &paths {
            match path.as_str() {
                "title" => title = true,
                "body" => body = true,
                "tags" => tags = true,
                _ => v.add(
                    "update_mask.paths",
                    format!("{path:?} is not one of title, body, tags"),
                ),
            }
        }
        if title {
            check_title(&mut v, "post.title", &patch.title);
        }
        if body {
            check_body(&mut v, "post.body", &patch.body);
        }
        if tags {
            check_tags(&mut v, "post.tags", &patch.tags);
        }
        v.into_result()?;

        let current = self
            .find_post(&patch.post_id)
            .await?
            .ok_or(Error::NotFound)?;
        if current.author_id != caller.sub && !self.is_moderator_now(&caller).await? {
            return Err(
                Error::PermissionDenied("only the author or a MODERATOR may edit a post").into(),
            );
        }
        if current.etag != req.etag {
            return Err(Error::StaleEtag.into());
        }
        let updated = PostRow {
            title: if title { patch.title } else { current.title },
            body: if body { patch.body } else { current.body },
            tags: if tags { patch.tags } else { current.tags },
            update_time: now_micros().max(current.update_time),
            etag: new_etag(),
            ..current
        };
        let mut tx = self.db().begin().await.map_err(Error::from)?;
        let changed = sqlx::query(
            "UPDATE posts SET title = $1, body = $2, tags = $3, update_time = $4, etag = $5 \
             WHERE post_id = $6 AND etag = $7",
        )
        .bind(&updated.title)
        .bind(&updated.body)
        .bind(tags_json(&updated.tags))
        .bind(updated.update_time)
        .bind(&updated.etag)
        .bind(&updated.post_id)
        .bind(&req.etag)
        .execute(&mut *tx)
        .await
        .map_err(Error::from)?
        .rows_affected();
        if changed == 0 {
            // Updated or deleted between our read and this write.
            return Err(Error::StaleEtag.into());
        }
        // Readers that keep copies (the gateway's cache) learn of the edit from here.
        append(
            &mut tx,
            Event::PostUpdated(PostUpdated {
                post: Some(updated.to_proto()),
            }),
        );
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(UpdatePostResponse {
            post: Some(updated.to_proto()),
        }))
    }

    async fn delete_post(
        &self,
        request: Request<DeletePostRequest>,
    ) -> Result<Response<DeletePostResponse>, Status> {
        let caller = end_user(&request)?.claims.clone();
        let req = request.into_inner();
        required(&req.post_id, "post_id")?;
        // Asked before the transaction, so no write lock is held across a network call.
        let moderator = self.is_moderator_now(&caller).await?;
        let mut tx = self.db().begin().await.map_err(Error::from)?;
        let author: Option<String> =
            sqlx::query_scalar("SELECT author_id FROM posts WHERE post_id = $1")
                .bind(&req.post_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::from)?;
        let author = author.ok_or(Error::NotFound)?;
        if author != caller.sub && !moderator {
            return Err(Error::PermissionDenied(
                "only the author or a MODERATOR may delete a post",
            )
            .into());
        }
        if !delete_post_in(&mut tx, &req.post_id, &author).await? {
            return Err(Error::NotFound.into());
        }
        tx.commit().await.map_err(Error::from)?;
        tracing::info!(post_id = %req.post_id, by = %caller.sub, "post deleted");
        Ok(Response::new(DeletePostResponse {}))
    }

    type WatchEventsStream = outbox::WatchStream<WatchEventsResponse>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.into_inner();
        // Read before the response goes out, so a follower from now misses nothing committed
        // after it has the headers.
        let after = if req.from_now {
            self.db().last_sequence().await.map_err(Error::from)?
        } else {
            req.after_sequence
        };
        Ok(Response::new(outbox::stream::<PostEvents>(
            self.db(),
            after,
            &req.event_fields,
        )?))
    }
}
