//! The gateway's public port with its own certificate (`TESSERA_PUBLIC_TLS_DIR`): grpcurl
//! verifies it the way an internet client does (`-cacert` of the issuer, `-servername` the
//! public name), the mesh CA does not, and a renewed certificate from another issuer is
//! served without a restart. Skipped, saying so, without grpcurl on PATH.
#![allow(clippy::unwrap_used)]

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tessera_testing::eventually_blocking;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

fn certs(dir: &Path, namespace: &str, service: &str) {
    let out = Command::new(TESSERA)
        .arg("certs")
        .arg("--dir")
        .arg(dir)
        .args(["--namespace", namespace, "--service", service])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `grpcurl -cacert CA -servername NAME ADDR list` succeeds.
fn verifies(ca: &Path, name: &str, addr: &str) -> bool {
    Command::new("grpcurl")
        .arg("-cacert")
        .arg(ca)
        .args(["-servername", name, "-max-time", "5", addr, "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Kills the gateway when the test ends, however it ends.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Replaces `dir`'s tls.crt and tls.key with `from`'s, each by an atomic rename.
fn replace(from: &Path, dir: &Path) {
    for file in ["tls.key", "tls.crt"] {
        let tmp = dir.join(format!("{file}.new"));
        std::fs::copy(from.join(file), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(file)).unwrap();
    }
}

#[test]
fn the_public_port_serves_the_public_certificate_and_its_renewals() {
    let found = Command::new("grpcurl")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!("skipped: grpcurl is not on PATH");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mesh = tmp.path().join("mesh");
    certs(&mesh, tessera_mesh::identity::DEFAULT_NAMESPACE, "gateway");
    // Two public issuers, each with a certificate for the public name `shop` (development
    // certificates also name localhost and 127.0.0.1; `shop` is the name checked here).
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    certs(&first, "public", "shop");
    certs(&second, "public", "shop");
    let public = tmp.path().join("public");
    std::fs::create_dir_all(&public).unwrap();
    replace(&first.join("shop"), &public);

    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(TESSERA);
    cmd.args(["serve", "gateway", "--grpc-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0", "--public-addr", &addr])
        .arg("--tls-dir")
        .arg(mesh.join("gateway"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .env("TESSERA_PUBLIC_TLS_DIR", &public)
        .env("TESSERA_TLS_RELOAD_MS", "200")
        .env("TESSERA_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for upstream in ["USERS", "POSTS", "COMMENTS", "NOTIFICATIONS"] {
        cmd.env(format!("TESSERA_{upstream}_TARGET"), "static:127.0.0.1:1");
    }
    let mut gateway = Gateway(cmd.spawn().unwrap());

    let started = Instant::now();
    eventually_blocking(Duration::from_secs(60), || {
        assert!(
            gateway.0.try_wait().unwrap().is_none(),
            "the gateway exited"
        );
        anyhow::ensure!(
            verifies(&first.join("ca.crt"), "shop", &addr),
            "grpcurl never verified the public name against its issuer"
        );
        Ok(())
    });
    println!("public port verified after {:?}", started.elapsed());
    assert!(
        !verifies(&mesh.join("ca.crt"), "shop", &addr),
        "the mesh CA verified it"
    );
    assert!(!verifies(&first.join("ca.crt"), "elsewhere.example", &addr));

    // A renewal from another issuer: picked up without a restart.
    let renewed = Instant::now();
    replace(&second.join("shop"), &public);
    eventually_blocking(Duration::from_secs(30), || {
        anyhow::ensure!(
            verifies(&second.join("ca.crt"), "shop", &addr),
            "the renewed certificate was never served"
        );
        Ok(())
    });
    println!("renewal served after {:?}", renewed.elapsed());
    assert!(!verifies(&first.join("ca.crt"), "shop", &addr));
    assert!(
        gateway.0.try_wait().unwrap().is_none(),
        "the gateway restarted"
    );
}
