//! The `sentinella serve` binary: starts on a new SQLite file (migrations), answers, stops cleanly
//! on SIGTERM, and finds its data again after a restart.
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{SqliteFile, free_port, wait_until_ok};

fn start(db: &str, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sentinella"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database",
            db,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("server binary starts")
}

fn terminate(mut child: Child) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn serve_stops_cleanly_on_sigterm_and_keeps_its_data() {
    let file = SqliteFile::new("proc");
    let db = file.url();
    let client = reqwest::Client::new();

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let child = start(&db, port);
    wait_until_ok(&format!("{base}/metadata"), String::new).await;
    let created = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","name":[{"family":"Verdi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_string();
    let id = location.split('/').nth_back(2).unwrap().to_string();
    assert!(terminate(child).success());

    // a second start runs the migrations again (a no-op) and serves the same data
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let child = start(&db, port);
    wait_until_ok(&format!("{base}/metadata"), String::new).await;
    let read = client
        .get(format!("{base}/Patient/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert!(read.text().await.unwrap().contains("Verdi"));
    assert!(terminate(child).success());
}
