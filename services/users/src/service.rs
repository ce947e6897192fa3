//! The UserService implementation ([`Users`]): its state, key ring upkeep and handlers.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tessera::users::v1::{
    BatchGetUsersRequest, BatchGetUsersResponse, CreateUserRequest, CreateUserResponse,
    DeleteUserRequest, DeleteUserResponse, GetJwksRequest, GetJwksResponse, GetUserRequest,
    GetUserResponse, Jwk, LoginRequest, LoginResponse, LogoutRequest, LogoutResponse,
    RefreshTokenRequest, RefreshTokenResponse, Role, SetUserRoleRequest, SetUserRoleResponse, User,
    UserCreated, UserDeleted, UserUpdated, WatchEventsRequest, WatchEventsResponse,
    user_service_server::UserService, watch_events_response::Event,
};
use tessera_mesh::{
    auth::{TokenKeys, end_user, maybe_end_user},
    errors::{Violations, invalid_field},
    token::Verifier,
};
use tessera_store::{Backend, Db, StoreError, Tx, now_micros, outbox, timestamp};
use tonic::{Request, Response, Status};

use crate::{
    Error, MIGRATIONS, UsersConfig, hashing,
    keys::{self, Kek, KeyPolicy, KeyRing},
    sessions::{self, MAX_TOKEN_LEN, share_lock},
    throttle,
};

/// The UserService implementation. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Users {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) db: Db,
    pub(crate) config: UsersConfig,
    pub(crate) kek: Kek,
    /// The signing key and every published key, swapped whole when the ring changes.
    pub(crate) keys: ArcSwap<KeyRing>,
    /// What this process's own server stack verifies tokens with; kept in step with `keys`.
    pub(crate) token_keys: TokenKeys,
    /// A real hash of a random password, verified against when a login names an unknown
    /// user, so both failures take the same time.
    pub(crate) dummy_hash: String,
    /// The bound on concurrent password hashing.
    pub(crate) hashing: hashing::Hashing,
    /// Failed logins per username.
    pub(crate) throttle: throttle::LoginThrottle,
}

impl Users {
    /// Opens (creating and migrating if needed) the database at `target` (a SQLite path or a
    /// `postgres://` URL) and loads or creates the signing keys.
    pub async fn open(target: &str, config: UsersConfig) -> Result<Users, Error> {
        let db = Db::open(target, MIGRATIONS).await?;
        Self::with_db(db, config).await
    }

    /// Like [`Users::open`] over an already connected database; runs [`MIGRATIONS`].
    pub async fn with_db(db: Db, config: UsersConfig) -> Result<Users, Error> {
        db.migrate(MIGRATIONS).await?;
        let kek = config
            .key_encryption_key
            .clone()
            .ok_or(Error::NoKeyEncryptionKey)?;
        let (ring, _) = keys::sync(&db, &kek, Self::policy(&config), false).await?;
        let token_keys = TokenKeys::fixed(ring.verifier.clone());
        let hashing = hashing::Hashing::new(
            config.password_params.clone(),
            config.hash_concurrency,
            config.hash_queue,
        )?;
        let dummy_hash = hashing
            .hash(uuid::Uuid::now_v7().simple().to_string())
            .await?;
        let throttle = throttle::LoginThrottle::new(config.login_failures_per_minute);
        Ok(Users {
            inner: Arc::new(Inner {
                db,
                config,
                kek,
                keys: ArcSwap::from_pointee(ring),
                token_keys,
                dummy_hash,
                hashing,
                throttle,
            }),
        })
    }

    fn policy(config: &UsersConfig) -> KeyPolicy {
        KeyPolicy {
            rotation: config.key_rotation,
            access_token_ttl: config.token_ttl,
        }
    }

    /// A verifier for tokens this service signs (every published key, as of now).
    pub fn verifier(&self) -> Verifier {
        self.inner.keys.load().verifier.clone()
    }

    /// The key set for this process's own server stack (`Workload::new`): updated whenever
    /// the key ring changes, so tokens signed by a new key verify here too.
    pub fn token_keys(&self) -> TokenKeys {
        self.inner.token_keys.clone()
    }

    /// Re-reads the key ring now: rotates if due (or when `rotate`), retires expired keys,
    /// and picks up keys made by other replicas or `tessera keys rotate`.
    pub async fn sync_keys(&self, rotate: bool) -> Result<(), Error> {
        if !rotate {
            let current = self.inner.keys.load_full();
            let loaded: Vec<&str> = current.jwks.iter().map(|(kid, _)| kid.as_str()).collect();
            let policy = Self::policy(&self.inner.config);
            let signing = current.signer.kid();
            if !keys::needs_sync(&self.inner.db, policy, &loaded, signing).await? {
                return Ok(());
            }
        }
        let (ring, _) = keys::sync(
            &self.inner.db,
            &self.inner.kek,
            Self::policy(&self.inner.config),
            rotate,
        )
        .await?;
        self.inner.token_keys.set(ring.verifier.clone());
        self.inner.keys.store(Arc::new(ring));
        Ok(())
    }

    /// Keeps the key ring current until `shutdown` turns `true`: checks every
    /// `keys::check_interval` (at most 5 s). Spawn one per process.
    pub async fn maintain_keys(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let every = keys::check_interval(self.inner.config.key_rotation);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            if let Err(err) = self.sync_keys(false).await {
                tracing::warn!(error = %tessera_store::error_chain(&err), "checking the signing keys failed");
            }
        }
    }

    /// The service's database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }
}

// The events this service appends to its outbox and serves from WatchEvents.
tessera_store::watch_events!(UserEvents = tessera::users::v1);

/// Most ids one BatchGetUsers may ask for.
pub(crate) const MAX_BATCH: usize = 100;
const MAX_DISPLAY_NAME: usize = 64;
const MIN_PASSWORD: usize = 8;
/// Hashing cost grows with input; nobody needs a longer password.
const MAX_PASSWORD_BYTES: usize = 1024;
const MAX_EMAIL: usize = 254;
const MAX_REQUEST_ID: usize = 128;

const USER_COLUMNS: &str =
    "user_id, username, display_name, email, password_hash, role, create_time";
type UserTuple = (String, String, String, String, String, String, i64);

/// A stored user, hash included; never leaves the service as is.
struct UserRow {
    user_id: String,
    username: String,
    display_name: String,
    email: String,
    password_hash: String,
    role: String,
    create_time: i64,
}

impl From<UserTuple> for UserRow {
    fn from(t: UserTuple) -> Self {
        let (user_id, username, display_name, email, password_hash, role, create_time) = t;
        Self {
            user_id,
            username,
            display_name,
            email,
            password_hash,
            role,
            create_time,
        }
    }
}

impl UserRow {
    /// The public view; the email only when `show_email`.
    fn to_proto(&self, show_email: bool) -> User {
        User {
            user_id: self.user_id.clone(),
            username: self.username.clone(),
            display_name: self.display_name.clone(),
            email: if show_email {
                self.email.clone()
            } else {
                String::new()
            },
            role: role_from_name(&self.role) as i32,
            create_time: Some(timestamp(self.create_time)),
        }
    }
}

fn role_from_name(name: &str) -> Role {
    match name {
        "ADMIN" => Role::Admin,
        "MODERATOR" => Role::Moderator,
        "USER" => Role::User,
        _ => Role::Unspecified,
    }
}

fn role_name(role: Role) -> Option<&'static str> {
    match role {
        Role::Admin => Some("ADMIN"),
        Role::Moderator => Some("MODERATOR"),
        Role::User => Some("USER"),
        Role::Unspecified => None,
    }
}

fn valid_username(s: &str) -> bool {
    (3..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A deliberately simple check: one `@`, a non-empty local part, a dotted domain of sane
/// characters, no whitespace or control characters. Deliverability is not our business.
fn valid_email(s: &str) -> bool {
    if s.len() > MAX_EMAIL || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn validate_create(req: &CreateUserRequest) -> Result<(), Status> {
    let mut v = Violations::new();
    v.check(
        !valid_username(&req.username),
        "username",
        "must be 3 to 32 characters of a-z, 0-9 and _",
    );
    v.check(
        !valid_email(&req.email),
        "email",
        "must be an email address",
    );
    v.check(
        req.password.chars().count() < MIN_PASSWORD,
        "password",
        "must be at least 8 characters",
    );
    v.check(
        req.password.len() > MAX_PASSWORD_BYTES,
        "password",
        "must be at most 1024 bytes",
    );
    let display = req.display_name.trim();
    v.check(display.is_empty(), "display_name", "is required");
    v.check(
        req.display_name.chars().count() > MAX_DISPLAY_NAME,
        "display_name",
        "must be at most 64 characters",
    );
    v.check(
        req.display_name.chars().any(char::is_control),
        "display_name",
        "must not contain control characters",
    );
    v.check(
        req.request_id.len() > MAX_REQUEST_ID,
        "request_id",
        "must be at most 128 bytes",
    );
    v.into_result()
}

fn required(value: &str, field: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid_field(field, "is required"));
    }
    Ok(())
}

/// One user by id, through the pool or a transaction.
async fn find_user_with<'e>(
    executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
    user_id: &str,
) -> Result<Option<UserRow>, Error> {
    let row: Option<UserTuple> = sqlx::query_as(&format!(
        "SELECT {USER_COLUMNS} FROM users WHERE user_id = $1"
    ))
    .bind(user_id)
    .fetch_optional(executor)
    .await
    .map_err(db_err)?;
    Ok(row.map(UserRow::from))
}

pub(crate) fn db_err(err: sqlx::Error) -> Error {
    Error::Store(StoreError::from(err))
}

impl Users {
    async fn find_user(&self, user_id: &str) -> Result<Option<UserRow>, Error> {
        find_user_with(self.db().pool(), user_id).await
    }

    /// [`Users::find_user`] inside a transaction.
    async fn find_user_in(&self, tx: &mut Tx, user_id: &str) -> Result<Option<UserRow>, Error> {
        find_user_with(&mut **tx, user_id).await
    }

    async fn find_by_username(&self, username: &str) -> Result<Option<UserRow>, Error> {
        let row: Option<UserTuple> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE username = $1"
        ))
        .bind(username)
        .fetch_optional(self.db().pool())
        .await
        .map_err(db_err)?;
        Ok(row.map(UserRow::from))
    }

    /// The user a previous CreateUser with this request id created, if any.
    async fn find_by_request(&self, request_id: &str) -> Result<Option<UserRow>, Error> {
        let row: Option<UserTuple> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE user_id = \
             (SELECT user_id FROM create_requests WHERE request_id = $1)"
        ))
        .bind(request_id)
        .fetch_optional(self.db().pool())
        .await
        .map_err(db_err)?;
        Ok(row.map(UserRow::from))
    }

    /// A retried CreateUser: the first result, if the retry is really the same request.
    fn replay(
        req: &CreateUserRequest,
        first: &UserRow,
    ) -> Result<Response<CreateUserResponse>, Status> {
        if first.username != req.username || first.email != req.email {
            return Err(invalid_field(
                "request_id",
                "was already used for a different request",
            ));
        }
        Ok(Response::new(CreateUserResponse {
            user: Some(first.to_proto(true)),
        }))
    }

    /// The username exists: either a concurrent retry with the same request id created it
    /// (return that), or the name is taken.
    async fn taken_or_replay(
        &self,
        req: &CreateUserRequest,
    ) -> Result<Response<CreateUserResponse>, Status> {
        if !req.request_id.is_empty()
            && let Some(first) = self.find_by_request(&req.request_id).await?
        {
            return Self::replay(req, &first);
        }
        Err(Error::UsernameTaken.into())
    }

    /// Whether a new user named `username` is the bootstrap admin: the configured name, no
    /// ADMIN exists, and no bootstrap grant was made before in this database. Decided in the
    /// inserting transaction (PostgreSQL: under a lock on `users`, so a concurrent
    /// promotion or grant cannot interleave), and recorded there.
    async fn bootstrap_grant(
        &self,
        tx: &mut Tx,
        username: &str,
        user_id: &str,
    ) -> Result<bool, Error> {
        if self.inner.config.bootstrap_admin.as_deref() != Some(username) {
            return Ok(false);
        }
        if tx.backend() == Backend::Postgres {
            sqlx::query("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut **tx)
                .await
                .map_err(db_err)?;
        }
        let admins: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role = 'ADMIN'")
            .fetch_one(&mut **tx)
            .await
            .map_err(db_err)?;
        let granted: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM bootstrap_admin")
            .fetch_one(&mut **tx)
            .await
            .map_err(db_err)?;
        if admins > 0 || granted > 0 {
            tracing::warn!(
                username,
                "TESSERA_BOOTSTRAP_ADMIN names this user, but an admin exists or was already granted; created as USER"
            );
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO bootstrap_admin (singleton, user_id, grant_time) VALUES (1, $1, $2)",
        )
        .bind(user_id)
        .bind(now_micros())
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
        Ok(true)
    }

    async fn insert_user(&self, user: &mut UserRow, request_id: &str) -> Result<(), Error> {
        let mut tx = self.db().begin().await?;
        if self
            .bootstrap_grant(&mut tx, &user.username, &user.user_id)
            .await?
        {
            "ADMIN".clone_into(&mut user.role);
        }
        sqlx::query(&format!(
            "INSERT INTO users ({USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&user.user_id)
        .bind(&user.username)
        .bind(&user.display_name)
        .bind(&user.email)
        .bind(&user.password_hash)
        .bind(&user.role)
        .bind(user.create_time)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if !request_id.is_empty() {
            sqlx::query("INSERT INTO create_requests (request_id, user_id) VALUES ($1, $2)")
                .bind(request_id)
                .bind(&user.user_id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        // Other services never see emails.
        let event = Event::UserCreated(UserCreated {
            user: Some(user.to_proto(false)),
        });
        append(&mut tx, event);
        tx.commit().await?;
        Ok(())
    }
}

/// A signed access token and when it expires, both ways OAuth2 clients read it.
struct AccessToken {
    token: String,
    expire_time: prost_types::Timestamp,
    expires_in: i64,
}

/// The refresh token of a RefreshToken or Logout request, checked before it is hashed.
fn refresh_token_field(token: &str) -> Result<(), Status> {
    let mut v = Violations::new();
    v.check(token.is_empty(), "refresh_token", "is required");
    v.check(
        token.len() > MAX_TOKEN_LEN,
        "refresh_token",
        "is not a refresh token (too long)",
    );
    v.into_result()
}

impl Users {
    fn access_token(&self, user_id: &str, role: &str) -> AccessToken {
        let (token, claims) =
            self.inner
                .keys
                .load()
                .signer
                .sign(user_id, role, self.inner.config.token_ttl);
        let exp = i64::try_from(claims.exp).unwrap_or(i64::MAX);
        AccessToken {
            token,
            expire_time: prost_types::Timestamp {
                seconds: exp,
                nanos: 0,
            },
            expires_in: exp.saturating_sub(i64::try_from(claims.iat).unwrap_or(0)),
        }
    }

    /// Whether the token's ADMIN claim still holds in the stored row (emails are shown to
    /// admins; a demoted or deleted one must not see them with a token minutes old).
    async fn admin_now(&self, claims: &tessera_mesh::auth::UserClaims) -> Result<bool, Error> {
        if !claims.is_admin() {
            return Ok(false);
        }
        let role: Option<String> = sqlx::query_scalar("SELECT role FROM users WHERE user_id = $1")
            .bind(&claims.sub)
            .fetch_optional(self.db().pool())
            .await
            .map_err(db_err)?;
        Ok(role.as_deref() == Some("ADMIN"))
    }

    /// A privileged decision: the acting user must exist and be ADMIN as stored now (not as
    /// the token says, which may be minutes old), read in the deciding transaction.
    async fn require_admin(
        &self,
        tx: &mut Tx,
        actor: &str,
        why: &'static str,
    ) -> Result<(), Error> {
        let role: Option<String> = sqlx::query_scalar(&format!(
            "SELECT role FROM users WHERE user_id = $1{}",
            share_lock(tx.backend())
        ))
        .bind(actor)
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err)?;
        if role.as_deref() == Some("ADMIN") {
            Ok(())
        } else {
            tracing::info!(actor, current_role = ?role, "privileged call refused on the current role");
            Err(Error::PermissionDenied(why))
        }
    }
}

/// Appends a WatchEvents payload (only the oneof set; sequence and time come from the outbox)
/// when `tx` commits.
fn append(tx: &mut Tx, event: Event) {
    outbox::append_on_commit::<UserEvents>(tx, event);
}

#[tonic::async_trait]
impl UserService for Users {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let req = request.into_inner();
        validate_create(&req)?;
        if !req.request_id.is_empty()
            && let Some(first) = self.find_by_request(&req.request_id).await?
        {
            return Self::replay(&req, &first);
        }
        // Fail fast before the deliberately slow hash (the insert still decides races).
        if self.find_by_username(&req.username).await?.is_some() {
            return self.taken_or_replay(&req).await;
        }
        let password_hash = self.inner.hashing.hash(req.password.clone()).await?;
        // USER unless this is the bootstrap admin, decided in the insert's transaction.
        let mut user = UserRow {
            user_id: uuid::Uuid::now_v7().to_string(),
            username: req.username.clone(),
            display_name: req.display_name.trim().to_owned(),
            email: req.email.clone(),
            password_hash,
            role: "USER".to_owned(),
            create_time: now_micros(),
        };
        match self.insert_user(&mut user, &req.request_id).await {
            Ok(()) => {
                tracing::info!(user_id = %user.user_id, role = %user.role, "user created");
                Ok(Response::new(CreateUserResponse {
                    user: Some(user.to_proto(true)),
                }))
            }
            Err(Error::Store(e)) if e.is_unique_violation() => self.taken_or_replay(&req).await,
            Err(e) => Err(e.into()),
        }
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        v.check(req.username.is_empty(), "username", "is required");
        v.check(req.password.is_empty(), "password", "is required");
        v.check(
            req.username.len() > 64 || req.password.len() > MAX_PASSWORD_BYTES,
            "password",
            "is too long",
        );
        v.into_result()?;
        // Before any lookup or hashing: a throttled name is refused, the right password too.
        self.inner.throttle.check(&req.username)?;
        let Some(user) = self.find_by_username(&req.username).await? else {
            // Same work, same answer as a wrong password.
            let hash = self.inner.dummy_hash.clone();
            self.inner.hashing.verify(hash, req.password).await?;
            self.inner.throttle.failed(&req.username);
            return Err(Error::BadCredentials.into());
        };
        let hash = user.password_hash.clone();
        if !self.inner.hashing.verify(hash, req.password).await? {
            self.inner.throttle.failed(&req.username);
            return Err(Error::BadCredentials.into());
        }
        self.inner.throttle.succeeded(&req.username);
        let refresh_token = self.start_session(&user.user_id).await?;
        let access = self.access_token(&user.user_id, &user.role);
        Ok(Response::new(LoginResponse {
            access_token: access.token,
            expire_time: Some(access.expire_time),
            user: Some(user.to_proto(true)),
            refresh_token,
            expires_in: access.expires_in,
        }))
    }

    async fn refresh_token(
        &self,
        request: Request<RefreshTokenRequest>,
    ) -> Result<Response<RefreshTokenResponse>, Status> {
        let req = request.into_inner();
        refresh_token_field(&req.refresh_token)?;
        let rotated = self
            .rotate(&req.refresh_token)
            .await?
            .map_err(|refused| Status::unauthenticated(refused.message()))?;
        let access = self.access_token(&rotated.user_id, &rotated.role);
        Ok(Response::new(RefreshTokenResponse {
            access_token: access.token,
            refresh_token: rotated.refresh_token,
            expires_in: access.expires_in,
            expire_time: Some(access.expire_time),
        }))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        let req = request.into_inner();
        refresh_token_field(&req.refresh_token)?;
        let revoked = self.end_session(&req.refresh_token).await?;
        tracing::debug!(revoked, "logout");
        Ok(Response::new(LogoutResponse {}))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let caller = maybe_end_user(&request).map(|u| u.claims.clone());
        let req = request.into_inner();
        required(&req.user_id, "user_id")?;
        let user = self.find_user(&req.user_id).await?.ok_or(Error::NotFound)?;
        let show_email = match &caller {
            Some(c) if c.sub == user.user_id => true,
            Some(c) => self.admin_now(c).await?,
            None => false,
        };
        Ok(Response::new(GetUserResponse {
            user: Some(user.to_proto(show_email)),
        }))
    }

    async fn batch_get_users(
        &self,
        request: Request<BatchGetUsersRequest>,
    ) -> Result<Response<BatchGetUsersResponse>, Status> {
        let caller = maybe_end_user(&request).map(|u| u.claims.clone());
        let req = request.into_inner();
        if req.user_ids.len() > MAX_BATCH {
            return Err(invalid_field("user_ids", "at most 100 ids per call"));
        }
        let mut unique: Vec<&str> = req
            .user_ids
            .iter()
            .map(String::as_str)
            .filter(|id| !id.is_empty())
            .collect();
        unique.sort_unstable();
        unique.dedup();
        if unique.is_empty() {
            return Ok(Response::new(BatchGetUsersResponse::default()));
        }
        let placeholders = (1..=unique.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE user_id IN ({placeholders})");
        let mut query = sqlx::query_as::<_, UserTuple>(&sql);
        for id in &unique {
            query = query.bind(*id);
        }
        let rows = query.fetch_all(self.db().pool()).await.map_err(db_err)?;
        let found: std::collections::HashMap<String, UserRow> = rows
            .into_iter()
            .map(|t| {
                let row = UserRow::from(t);
                (row.user_id.clone(), row)
            })
            .collect();
        let admin = match &caller {
            Some(c) => self.admin_now(c).await?,
            None => false,
        };
        let users = req
            .user_ids
            .iter()
            .filter_map(|id| found.get(id))
            .map(|row| {
                let own = caller.as_ref().is_some_and(|c| c.sub == row.user_id);
                row.to_proto(own || admin)
            })
            .collect();
        Ok(Response::new(BatchGetUsersResponse { users }))
    }

    async fn get_jwks(
        &self,
        _request: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        let keys = self
            .inner
            .keys
            .load()
            .jwks
            .iter()
            .map(|(kid, x)| Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                kid: kid.clone(),
                x: x.clone(),
                alg: "EdDSA".into(),
                r#use: "sig".into(),
            })
            .collect();
        Ok(Response::new(GetJwksResponse { keys }))
    }

    async fn set_user_role(
        &self,
        request: Request<SetUserRoleRequest>,
    ) -> Result<Response<SetUserRoleResponse>, Status> {
        const ONLY_ADMIN: &str = "only an ADMIN may change roles";
        let caller = end_user(&request)?.claims.clone();
        if !caller.is_admin() {
            return Err(Error::PermissionDenied(ONLY_ADMIN).into());
        }
        let req = request.into_inner();
        let mut v = Violations::new();
        v.check(req.user_id.is_empty(), "user_id", "is required");
        let role = Role::try_from(req.role).ok().and_then(role_name);
        v.check(role.is_none(), "role", "must be USER, MODERATOR or ADMIN");
        v.into_result()?;
        let role = role.unwrap_or("USER");
        let mut tx = self.db().begin().await.map_err(Error::from)?;
        self.require_admin(&mut tx, &caller.sub, ONLY_ADMIN).await?;
        let current: Option<String> = sqlx::query_scalar(&format!(
            "SELECT role FROM users WHERE user_id = $1{}",
            share_lock(tx.backend())
        ))
        .bind(&req.user_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let current = current.ok_or(Error::NotFound)?;
        if current != role {
            sqlx::query("UPDATE users SET role = $1 WHERE user_id = $2")
                .bind(role)
                .bind(&req.user_id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            // Sessions carry the role into new access tokens: the user logs in again.
            sessions::revoke_user(&mut tx, &req.user_id).await?;
        }
        // Read in the transaction, so the event carries the row as committed.
        let user = self
            .find_user_in(&mut tx, &req.user_id)
            .await?
            .ok_or(Error::NotFound)?;
        if current != role {
            // Readers that keep copies of profiles (the gateway's cache) learn of it from here.
            let event = Event::UserUpdated(UserUpdated {
                user: Some(user.to_proto(false)),
            });
            append(&mut tx, event);
        }
        tx.commit().await.map_err(Error::from)?;
        tracing::info!(user_id = %req.user_id, role, by = %caller.sub, "role changed");
        Ok(Response::new(SetUserRoleResponse {
            user: Some(user.to_proto(true)),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        let caller = end_user(&request)?.claims.clone();
        let req = request.into_inner();
        required(&req.user_id, "user_id")?;
        if caller.sub != req.user_id && !caller.is_admin() {
            return Err(
                Error::PermissionDenied("only the user or an ADMIN may delete a user").into(),
            );
        }
        let mut tx = self.db().begin().await.map_err(Error::from)?;
        if caller.sub != req.user_id {
            self.require_admin(
                &mut tx,
                &caller.sub,
                "only the user or an ADMIN may delete a user",
            )
            .await?;
        }
        let deleted = sqlx::query("DELETE FROM users WHERE user_id = $1")
            .bind(&req.user_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
        if deleted == 0 {
            return Err(Error::NotFound.into());
        }
        sqlx::query("DELETE FROM create_requests WHERE user_id = $1")
            .bind(&req.user_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sessions::revoke_user(&mut tx, &req.user_id).await?;
        append(
            &mut tx,
            Event::UserDeleted(UserDeleted {
                user_id: req.user_id.clone(),
            }),
        );
        tx.commit().await.map_err(Error::from)?;
        tracing::info!(user_id = %req.user_id, by = %caller.sub, "user deleted");
        Ok(Response::new(DeleteUserResponse {}))
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
        Ok(Response::new(outbox::stream::<UserEvents>(
            self.db(),
            after,
            &req.event_fields,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["abc", "a_1", &"x".repeat(32)] {
            assert!(valid_username(ok), "{ok}");
        }
        for bad in ["ab", "Abc", "a-b", "a b", "", &"x".repeat(33), "é_é"] {
            assert!(!valid_username(bad), "{bad}");
        }
    }

    #[test]
    fn emails() {
        for ok in ["a@b.co", "first.last+tag@mail.example.org", "x@a-b.c"] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "", "a", "a@", "@b.co", "a@b", "a@@b.co", "a b@c.d", "a@b..co", "a@.b", "a@b.co.",
            "a@b_c.d",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
