//! Idle and half-sent connections cannot exhaust the server: the `sentinella serve` binary closes a
//! connection whose headers do not arrive in time and keeps at most `--max-connections` open, so a
//! legitimate client is served while others hold connections open without a token.
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::process::{SqliteFile, free_port, wait_until_ok};

/// The server process, killed when dropped (then its database file is removed).
struct Server {
    child: Child,
    port: u16,
    _db: SqliteFile,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(extra: &[&str]) -> Server {
    let db = SqliteFile::new("conn");
    let port = free_port();
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--database".into(),
        db.url(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = Command::new(env!("CARGO_BIN_EXE_sentinella"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("server binary starts");
    let server = Server {
        child,
        port,
        _db: db,
    };
    wait_until_ok(
        &format!("http://127.0.0.1:{port}/fhir/metadata"),
        String::new,
    )
    .await;
    server
}

/// Read until the server closes the connection; `None` if it is still open at the deadline.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn a_half_sent_request_is_closed_after_the_header_timeout() {
    let server = start(&["--header-timeout-secs", "1"]).await;
    let mut s = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    s.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(5))
            .await
            .is_some(),
        "the half-sent request was kept open"
    );
    // an idle keep-alive connection too
    let mut s = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    s.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("the idle connection was kept open");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn idle_connections_beyond_the_cap_do_not_lock_out_a_real_client() {
    let server = start(&["--header-timeout-secs", "1", "--max-connections", "8"]).await;
    // 40 connections that never send a byte (no token needed to do this)
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(
            TcpStream::connect(("127.0.0.1", server.port))
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{}/fhir/metadata", server.port))
        .send()
        .await
        .expect("the real client is served");
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "served only after {:?}",
        started.elapsed()
    );
    drop(idle);
}

#[tokio::test]
async fn a_body_that_stops_arriving_fails_its_request_and_stores_nothing() {
    let server = start(&["--body-timeout-secs", "1"]).await;
    let mut s = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    s.write_all(
        b"POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n{\"resourceType\":",
    )
    .await
    .unwrap();
    let got = closed_within(&mut s, Duration::from_secs(10))
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&got);
    assert!(!text.starts_with("HTTP/1.1 413"), "{text}");
    let all = reqwest::get(format!("http://127.0.0.1:{}/fhir/Patient", server.port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(all.contains("\"total\":0"), "{all}");
}
