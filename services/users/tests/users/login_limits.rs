//! The bounds on unauthenticated work: failed-login throttling per username and the
//! password-hashing queue, through the handlers (no sockets), on SQLite and, when
//! `TESSERA_TEST_DATABASE_URL` is set, on PostgreSQL.

use tessera::users::v1::LoginResponse;
use tessera_users::UsersConfig;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::{PASSWORD, cheap_hashing, create, login, services};

fn cheap(failures_per_minute: u32) -> UsersConfig {
    UsersConfig {
        password_params: cheap_hashing(),
        login_failures_per_minute: failures_per_minute,
        key_encryption_key: Some(tessera_users::Kek::generate().unwrap()),
        ..UsersConfig::default()
    }
}

fn assert_throttled(result: Result<LoginResponse, Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::ResourceExhausted, "{what}: {status:?}");
    assert!(
        status.message().contains("try again in"),
        "{what}: a retry hint in {:?}",
        status.message()
    );
    let retry = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or_else(|| panic!("{what}: RetryInfo in {status:?}"));
    assert!(!retry.is_zero(), "{what}: a retry delay");
}

#[tokio::test]
async fn repeated_failures_throttle_the_name_even_for_the_right_password() {
    let (svcs, _dbs) = services("limits_throttle", cheap(3)).await;
    for svc in svcs {
        create(&svc, "alice").await;
        create(&svc, "bob").await;
        for i in 0..3 {
            let err = login(&svc, "alice", "wrong password").await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "failure {i}");
        }
        // The right password no longer helps: the guessing must stop, not go on.
        assert_throttled(
            login(&svc, "alice", PASSWORD).await,
            "alice, right password",
        );
        assert_throttled(login(&svc, "alice", "another guess").await, "alice, guess");
        // Other names are not affected.
        login(&svc, "bob", PASSWORD).await.unwrap();
        // Unknown names behave the same, so the answers do not tell which names exist.
        for _ in 0..3 {
            let err = login(&svc, "ghost", "wrong password").await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated);
        }
        assert_throttled(login(&svc, "ghost", "x").await, "unknown name");
    }
}

#[tokio::test]
async fn a_successful_login_forgets_earlier_failures() {
    let (svcs, _dbs) = services("limits_success", cheap(3)).await;
    for svc in svcs {
        create(&svc, "alice").await;
        for _ in 0..3 {
            login(&svc, "alice", "wrong password").await.unwrap_err();
            login(&svc, "alice", "wrong again!").await.unwrap_err();
            login(&svc, "alice", PASSWORD).await.unwrap();
        }
    }
}

#[tokio::test]
async fn logins_past_the_hashing_queue_are_resource_exhausted() {
    // One hash at a time, no queue, and a cost that makes a hash last long enough for the
    // other calls to arrive while it runs.
    let config = UsersConfig {
        password_params: argon2::Params::new(16 * 1024, 4, 1, None).unwrap(),
        hash_concurrency: 1,
        hash_queue: 0,
        // One failure throttles a name: shows which refusals counted as failures.
        login_failures_per_minute: 1,
        key_encryption_key: Some(tessera_users::Kek::generate().unwrap()),
        ..UsersConfig::default()
    };
    let (svcs, _dbs) = services("limits_queue", config).await;
    for svc in svcs {
        let calls = (0..8).map(|i| {
            let svc = svc.clone();
            async move { login(&svc, &format!("nobody{i}"), "wrong password").await }
        });
        let results = futures::future::join_all(calls).await;
        let codes: Vec<Code> = results
            .iter()
            .map(|r| r.as_ref().unwrap_err().code())
            .collect();
        println!("8 concurrent logins, 1 hashing slot, no queue: {codes:?}");
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, Code::Unauthenticated | Code::ResourceExhausted)),
            "{codes:?}"
        );
        assert!(codes.contains(&Code::Unauthenticated), "{codes:?}");
        assert!(codes.contains(&Code::ResourceExhausted), "{codes:?}");
        // A refusal for a full queue is not a failed login: that name is not throttled,
        // while a name whose password was checked and wrong is.
        for (i, code) in codes.iter().enumerate() {
            let again = login(&svc, &format!("nobody{i}"), "wrong")
                .await
                .unwrap_err();
            if *code == Code::ResourceExhausted {
                assert_eq!(again.code(), Code::Unauthenticated, "nobody{i}: {again:?}");
            } else {
                assert!(
                    again.message().contains("failed logins"),
                    "nobody{i}: {again:?}"
                );
            }
        }
    }
}
