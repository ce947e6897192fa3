//! Clients pin the identity of the service they dial: a replica holding another workload's
//! certificate (one from the same CA, so the chain is fine) fails the handshake, gets no call,
//! and the refusal is logged with both ids.
//!
//! A binary of its own: it installs the process-wide subscriber to read the log lines (a
//! thread-local one is not reliably seen by callsites other tests register at the same time).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code, unused_imports)]
#[path = "client/support.rs"]
mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use tessera::users::v1::{GetUserRequest, user_service_client::UserServiceClient};
use tessera_client::{Channel, ClientBuilder, Targets};
use tessera_mesh::{
    certs::Ca,
    tls::{TlsFiles, TlsSource},
};
use tessera_testing::tls::{issue, spiffe};
use tonic::Code;

use support::{Replica, target};

/// Everything logged by the process, for assertions on log lines.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .init();
        logs
    })
    .clone()
}

/// Refused connects fail after `connect_timeout`; calls that should succeed get a patient
/// builder, so a slow handshake on a busy machine is not mistaken for a refusal.
fn builder(files: TlsFiles, connect_timeout: Duration) -> ClientBuilder {
    ClientBuilder::mtls_files(files, Duration::from_secs(60))
        .unwrap()
        .connect_timeout(connect_timeout)
}

const REFUSED: Duration = Duration::from_millis(400);
const PATIENT: Duration = Duration::from_secs(5);

async fn get_user(channel: Channel) -> Result<String, tonic::Status> {
    let response = UserServiceClient::new(channel)
        .get_user(GetUserRequest {
            user_id: "u-1".into(),
        })
        .await?;
    Ok(response.into_inner().user.unwrap_or_default().user_id)
}

/// The call fails UNAVAILABLE without reaching the replica, and a log line names both ids.
async fn refused(channel: Channel, replica: &Replica, expected: &str, presented: &str) {
    let gets = replica.behaviour.gets();
    let status = get_user(channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(replica.behaviour.gets(), gets, "the impostor got the call");
    let line = logs()
        .text()
        .lines()
        .find(|l| l.contains(&format!("expected={expected}")) && l.contains(presented))
        .map(str::to_owned);
    let line = line.unwrap_or_else(|| {
        panic!(
            "no log line names expected {expected} and presented {presented}:\n{}",
            logs().text()
        )
    });
    assert!(line.contains("another identity"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_another_workloads_certificate_fails_the_handshake() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("tessera test CA").unwrap();
    let users = Replica::start_mtls(
        TlsSource::load(issue(&ca, "users", dir.path()))
            .unwrap()
            .mtls_server_config(),
    )
    .await;
    let impostor = Replica::start_mtls(
        TlsSource::load(issue(&ca, "notifications", dir.path()))
            .unwrap()
            .mtls_server_config(),
    )
    .await;
    let operator = Replica::start_mtls(
        TlsSource::load(issue(&ca, "operator", dir.path()))
            .unwrap()
            .mtls_server_config(),
    )
    .await;
    let posts_files = issue(&ca, "posts", dir.path());
    let posts = builder(posts_files.clone(), REFUSED);
    let patient = builder(posts_files, PATIENT);

    // The real users replica answers a channel pinned to users, by name or by id.
    let ok = get_user(patient.channel_to("users", &target(&[&users])).unwrap()).await;
    assert_eq!(ok.unwrap(), "u-1");
    let ok = get_user(
        patient
            .channel_for(&spiffe("users"), &target(&[&users]))
            .unwrap(),
    )
    .await;
    assert_eq!(ok.unwrap(), "u-1");

    // A notifications certificate posing as users.
    let users_id = spiffe("users").to_string();
    refused(
        posts.channel_to("users", &target(&[&impostor])).unwrap(),
        &impostor,
        &users_id,
        &spiffe("notifications").to_string(),
    )
    .await;

    // The typed clients pin each service too.
    let clients = posts
        .clients(&Targets {
            users: Some(target(&[&impostor])),
            ..Targets::default()
        })
        .unwrap();
    let gets = impostor.behaviour.gets();
    let status = clients
        .users()
        .get_user(GetUserRequest {
            user_id: "u-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(impostor.behaviour.gets(), gets);

    // The development operator identity cannot pose as a service: not pinned, and not even
    // on an unpinned channel that accepts any workload of the trust domain.
    refused(
        posts.channel_to("users", &target(&[&operator])).unwrap(),
        &operator,
        &users_id,
        &spiffe("operator").to_string(),
    )
    .await;
    refused(
        posts.channel(&target(&[&operator])).unwrap(),
        &operator,
        "spiffe://tessera.local/ns/*/sa/*",
        &spiffe("operator").to_string(),
    )
    .await;

    // With both replicas behind one target, every call lands on the real one.
    let both = patient
        .channel_to("users", &target(&[&users, &impostor]))
        .unwrap();
    let before = users.behaviour.gets();
    for _ in 0..10 {
        assert_eq!(get_user(both.clone()).await.unwrap(), "u-1");
    }
    assert_eq!(users.behaviour.gets(), before + 10);
}

#[tokio::test]
async fn a_pinned_name_that_is_no_service_account_is_refused_at_build() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("tessera test CA").unwrap();
    let posts = builder(issue(&ca, "posts", dir.path()), REFUSED);
    let err = posts
        .channel_to("Users/x", "static:127.0.0.1:1")
        .unwrap_err();
    assert!(err.to_string().contains("channel_to"), "{err}");
}
