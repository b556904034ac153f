//! For tests that run the `sentinella` binary as a process of its own: a free port, a SQLite file
//! that cleans up after itself, and waiting for the server to answer.
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A loopback port nobody listens on now (the tests' own servers are the only ones that bind here,
/// each on a port of its own).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh SQLite file in the temporary folder, removed with its WAL and shared memory when
/// dropped, also when the test fails.
pub struct SqliteFile {
    pub path: PathBuf,
}

impl SqliteFile {
    /// `sentinella-<what>-<random>.db`.
    pub fn new(what: &str) -> SqliteFile {
        SqliteFile {
            path: std::env::temp_dir().join(format!(
                "sentinella-{what}-{}.db",
                uuid::Uuid::new_v4().simple()
            )),
        }
    }

    /// The `--database` URL of the file.
    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

/// Wait until `url` answers 200: a debug binary starts (and migrates a new database) in a second
/// or two; after 60 s the test fails with `context()` (the server's log, say).
pub async fn wait_until_ok(url: &str, context: impl Fn() -> String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server at {url} did not come up\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `sentinella serve` on a free port and a fresh SQLite file, with the documented defaults
/// whatever `SENTINELLA_*` the environment sets, its output in a log file. Killed, and its files
/// removed, when dropped, also when the test fails.
pub struct ServerProcess {
    child: tokio::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub origin: String,
    log: PathBuf,
    _db: SqliteFile,
}

impl ServerProcess {
    /// Started with `args` after `serve --listen … --database …`, once `/fhir/metadata` answers.
    pub async fn start(what: &str, args: &[&str]) -> ServerProcess {
        let db = SqliteFile::new(what);
        let log = db.path.with_extension("log");
        let port = free_port();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinella"));
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database", &db.url()])
            .args(args)
            .stdout(std::process::Stdio::from(
                std::fs::File::create(&log).unwrap(),
            ))
            .stderr(std::process::Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ))
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SENTINELLA_") {
                command.env_remove(key);
            }
        }
        let server = ServerProcess {
            child: command.spawn().expect("the server binary starts"),
            origin: format!("http://127.0.0.1:{port}"),
            log,
            _db: db,
        };
        wait_until_ok(&format!("{}/fhir/metadata", server.origin), || {
            server.log_tail()
        })
        .await;
        server
    }

    /// The FHIR base, `http://127.0.0.1:<port>/fhir`.
    pub fn base(&self) -> String {
        format!("{}/fhir", self.origin)
    }

    /// The last 40 lines the server logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
