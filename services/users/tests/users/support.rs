//! What the UserService tests share: services over fresh databases, cheap password hashing
//! and short calls.

use tessera::users::v1::{
    CreateUserRequest, LoginRequest, LoginResponse, User, user_service_server::UserService,
};
use tessera_store::testing::{self, TestDb};
use tessera_users::{MIGRATIONS, Users, UsersConfig};
use tonic::{Request, Status};

/// The password every [`signup`] sets.
pub(crate) const PASSWORD: &str = "correct horse";

/// Argon2 at its cheapest: these tests are about behaviour, not cost.
pub(crate) fn cheap_hashing() -> argon2::Params {
    argon2::Params::new(256, 1, 1, None).unwrap()
}

/// A fresh service on SQLite, plus one on PostgreSQL when configured; keep the databases.
pub(crate) async fn services(label: &str, config: UsersConfig) -> (Vec<Users>, Vec<TestDb>) {
    let dbs = testing::databases(label, MIGRATIONS).await;
    let mut out = Vec::new();
    for t in &dbs {
        out.push(Users::with_db(t.db.clone(), config.clone()).await.unwrap());
    }
    (out, dbs)
}

pub(crate) fn signup(username: &str) -> CreateUserRequest {
    CreateUserRequest {
        username: username.into(),
        email: format!("{username}@example.org"),
        password: PASSWORD.into(),
        display_name: format!("{username} display"),
        request_id: String::new(),
    }
}

pub(crate) async fn create(svc: &Users, username: &str) -> User {
    svc.create_user(Request::new(signup(username)))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

pub(crate) async fn login(
    svc: &Users,
    username: &str,
    password: &str,
) -> Result<LoginResponse, Status> {
    svc.login(Request::new(LoginRequest {
        username: username.into(),
        password: password.into(),
    }))
    .await
    .map(tonic::Response::into_inner)
}
