//! Compile-time check: the futures services hold in tonic handlers and spawned tasks are
//! `Send` (sqlx's higher-ranked `Executor` bounds make this easy to break).
#![allow(clippy::unwrap_used, dead_code)]

use tessera_store::Db;

fn is_send<T: Send>(_: T) {}

fn store_futures_are_send(db: Db) {
    is_send(async move {
        let db = Db::open("x", &[]).await.unwrap();
        db.migrate(&[]).await.unwrap();
        db.read_events(0, 1).await.unwrap();
        db.cursor("a").await.unwrap();
        let mut tx = db.begin().await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        let _: Option<i64> = sqlx::query_scalar("SELECT 1")
            .fetch_optional(&mut *tx)
            .await
            .unwrap();
        tx.append_event(b"x").await.unwrap();
        tx.advance_cursor("a", 1).await.unwrap();
        tx.set_cursor("a", 1).await.unwrap();
        tx.cursor("a").await.unwrap();
        tx.commit().await.unwrap();
        db.begin().await.unwrap().rollback().await.unwrap();
    });
    is_send(db.events(0));
}

#[test]
fn compiles() {}
