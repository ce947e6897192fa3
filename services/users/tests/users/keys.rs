//! Token signing keys: sealed at rest under the key-encryption key, rotated on a schedule and
//! on demand, old keys published until their tokens have expired, plaintext keys of older
//! versions sealed at start; on SQLite and, when configured, PostgreSQL.

use std::time::Duration;

use tessera::users::v1::{GetJwksRequest, user_service_server::UserService};
use tessera_mesh::token::{Signer, Verifier};
use tessera_store::testing::{self, TestDb};
use tessera_users::{Kek, MIGRATIONS, Users, UsersConfig, keys::PUBLISH_AHEAD};
use tonic::Request;

use crate::support::{PASSWORD, cheap_hashing, login, signup};

fn config(kek: &Kek) -> UsersConfig {
    UsersConfig {
        password_params: cheap_hashing(),
        token_ttl: Duration::from_secs(600),
        key_encryption_key: Some(kek.clone()),
        ..UsersConfig::default()
    }
}

async fn token(svc: &Users) -> String {
    // Refused after the first call (alice exists then); only the login matters.
    let _ = svc.create_user(Request::new(signup("alice"))).await;
    login(svc, "alice", PASSWORD).await.unwrap().access_token
}

async fn published(svc: &Users) -> Vec<String> {
    svc.get_jwks(Request::new(GetJwksRequest {}))
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.kid)
        .collect()
}

/// Moves every key's creation back by `by`, as if that much time had passed.
async fn age_keys(t: &TestDb, by: Duration) {
    sqlx::query("UPDATE sealed_signing_keys SET create_time = create_time - $1")
        .bind(i64::try_from(by.as_micros()).unwrap())
        .execute(t.db.pool())
        .await
        .unwrap();
}

async fn databases(label: &str) -> Vec<TestDb> {
    testing::databases(label, MIGRATIONS).await
}

#[tokio::test]
async fn keys_are_sealed_at_rest_and_need_the_same_kek() {
    for t in databases("keys_sealed").await {
        let kek = Kek::generate().unwrap();
        let svc = Users::with_db(t.db.clone(), config(&kek)).await.unwrap();
        let tok = token(&svc).await;
        let rows: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT kid, sealed FROM sealed_signing_keys")
                .fetch_all(t.db.pool())
                .await
                .unwrap();
        assert_eq!(rows.len(), 1, "{}", t.name);
        // A PKCS#8 Ed25519 key starts with this DER prefix; the sealed form must not.
        let der_prefix = [0x30, 0x53, 0x02, 0x01, 0x01];
        assert!(!rows[0].1.windows(5).any(|w| w == der_prefix), "{}", t.name);
        assert!(Signer::from_pkcs8(&rows[0].1).is_err());

        // Another process with the same KEK reads the key; one with another KEK cannot.
        let again = Users::with_db(t.db.clone(), config(&kek)).await.unwrap();
        assert!(again.verifier().verify(&tok).is_ok());
        let other = Kek::generate().unwrap();
        let err = Users::with_db(t.db.clone(), config(&other))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("corrupt"), "{err}");
        // No KEK at all is refused, not a plaintext fallback.
        let none = UsersConfig {
            key_encryption_key: None,
            ..config(&kek)
        };
        assert!(Users::with_db(t.db.clone(), none).await.is_err());
    }
}

#[tokio::test]
async fn plaintext_keys_of_older_versions_are_sealed_at_start() {
    for t in databases("keys_migrate").await {
        let old = Signer::generate().unwrap();
        sqlx::query("INSERT INTO signing_keys (kid, pkcs8, create_time) VALUES ($1, $2, $3)")
            .bind(old.kid())
            .bind(old.pkcs8())
            .bind(tessera_store::now_micros())
            .execute(t.db.pool())
            .await
            .unwrap();
        let (old_token, _) = old.sign("u1", "USER", Duration::from_secs(60));
        let kek = Kek::generate().unwrap();
        let svc = Users::with_db(t.db.clone(), config(&kek)).await.unwrap();
        let plain: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM signing_keys")
            .fetch_one(t.db.pool())
            .await
            .unwrap();
        assert_eq!(plain, 0, "{}: the plaintext is gone", t.name);
        assert_eq!(published(&svc).await, vec![old.kid().to_owned()]);
        assert!(svc.verifier().verify(&old_token).is_ok());
    }
}

#[tokio::test]
async fn rotation_on_demand_and_on_schedule_keeps_old_tokens_valid() {
    for t in databases("keys_rotate").await {
        let kek = Kek::generate().unwrap();
        let svc = Users::with_db(t.db.clone(), config(&kek)).await.unwrap();
        let first = token(&svc).await;
        let first_kid = Verifier::peek_kid(&first).unwrap();
        let own = svc.token_keys();

        // Nothing due: a check changes nothing.
        svc.sync_keys(false).await.unwrap();
        assert_eq!(published(&svc).await, vec![first_kid.clone()]);

        // On demand, from elsewhere (`tessera keys rotate`), picked up by the next check:
        // published at once, signing only once every replica has had time to publish it.
        let new_kid = tessera_users::rotate_now(&t.db, &kek).await.unwrap();
        assert_ne!(new_kid, first_kid);
        svc.sync_keys(false).await.unwrap();
        assert_eq!(
            published(&svc).await,
            vec![new_kid.clone(), first_kid.clone()]
        );
        let early = token(&svc).await;
        assert_eq!(
            Verifier::peek_kid(&early).unwrap(),
            first_kid,
            "not signing yet"
        );
        age_keys(&t, PUBLISH_AHEAD + Duration::from_secs(1)).await;
        svc.sync_keys(false).await.unwrap();
        let second = token(&svc).await;
        assert_eq!(
            Verifier::peek_kid(&second).unwrap(),
            new_kid,
            "the new key signs"
        );
        assert_eq!(
            published(&svc).await,
            vec![new_kid.clone(), first_kid.clone()]
        );
        // Both verify, in this process's own stack too.
        assert!(own.verify(&first).await.is_ok());
        assert!(own.verify(&second).await.is_ok());

        // On schedule: a day later the newest key is due (default rotation: a day), and
        // the first key, whose tokens expired long ago, is retired.
        age_keys(&t, Duration::from_secs(24 * 3600 + 1)).await;
        svc.sync_keys(false).await.unwrap();
        let kids = published(&svc).await;
        assert_eq!(kids.len(), 2, "{}: {kids:?}", t.name);
        assert_eq!(kids[1], new_kid, "the previous key is still published");
        assert!(!kids.contains(&first_kid), "the first key is retired");
        // The scheduled key is published ahead too, then takes over.
        assert_eq!(Verifier::peek_kid(&token(&svc).await).unwrap(), new_kid);
        age_keys(&t, PUBLISH_AHEAD + Duration::from_secs(1)).await;
        svc.sync_keys(false).await.unwrap();
        let third = token(&svc).await;
        assert_eq!(Verifier::peek_kid(&third).unwrap(), kids[0]);
        assert!(svc.verifier().verify(&second).is_ok());
    }
}
