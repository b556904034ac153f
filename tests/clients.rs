//! Unmodified FHIR clients against the real server binary: the Python suite (`fhirpy`, every answer
//! parsed as R4 by `fhir.resources` 6.4.0) and the JavaScript one (`fhir-kit-client`), each doing
//! CRUD, search with paging, a transaction, `$validate` and `$expand` (clients/README.md).
//!
//! Each test starts `sentinella serve` on a free port with a fresh SQLite file in development mode
//! (no access file: one user, every right) and runs one suite against it. The suites' packages are
//! installed by .ci/run; where they are missing the test fails and says how to install them.
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::process::ServerProcess;
use tokio::process::Command;

/// A suite does about a hundred requests; this only stops a hung one.
const SUITE_TIMEOUT: Duration = Duration::from_secs(300);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Run a suite against a fresh server; fail with its output (and the server's log) unless it
/// passed every step.
async fn run_suite(program: &Path, script: &str) {
    let server = ServerProcess::start("clients", &[]).await;
    let mut command = Command::new(program);
    command
        .arg(root().join(script))
        .arg(server.base())
        .current_dir(root())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SUITE_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish in {SUITE_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{} cannot run: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}\n--- server log (tail) ---\n{}",
        output.status,
        server.log_tail()
    );
    // a suite that ran no step has not passed
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.ends_with(" passed, 0 failed") && !last.contains(": 0 passed"),
        "{script} did not report its steps: {last:?}"
    );
}

/// The Python of the suite: the one named by SENTINELLA_CLIENTS_PYTHON, else the suite's virtual
/// environment (made by .ci/run), else `python3`; it must have the pinned packages.
fn python() -> PathBuf {
    let install = "python3 -m venv clients/python/.venv && \
                   clients/python/.venv/bin/pip install -r clients/python/requirements.txt";
    let venv = root().join("clients/python/.venv/bin/python3");
    let python = match std::env::var_os("SENTINELLA_CLIENTS_PYTHON") {
        Some(p) => PathBuf::from(p),
        None if venv.exists() => venv,
        None => PathBuf::from("python3"),
    };
    let check = std::process::Command::new(&python)
        .args([
            "-c",
            "import fhirpy, fhir.resources; assert fhir.resources.__version__ == '6.4.0', \
             fhir.resources.__version__",
        ])
        .output();
    match check {
        Ok(o) if o.status.success() => python,
        Ok(o) => panic!(
            "{} lacks the Python client suite's packages ({}); install them with\n  {install}",
            python.display(),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        ),
        Err(e) => panic!(
            "{} cannot run ({e}); the client suite needs Python 3 with its packages:\n  {install}",
            python.display()
        ),
    }
}

/// Node.js, with the suite's packages installed from its lockfile.
fn node() -> PathBuf {
    let install = "npm ci --prefix clients/js";
    let installed = root().join("clients/js/node_modules/fhir-kit-client/package.json");
    let version = std::fs::read_to_string(&installed)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(String::from));
    assert_eq!(
        version.as_deref(),
        Some("2.0.3"),
        "fhir-kit-client 2.0.3 is not installed in clients/js/node_modules; install it with\n  {install}"
    );
    let node = PathBuf::from("node");
    match std::process::Command::new(&node).arg("--version").output() {
        Ok(o) if o.status.success() => node,
        _ => panic!("node (Node.js 20 or later) is needed to run clients/js/suite.js"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhirpy_with_r4_models_passes_its_suite() {
    run_suite(&python(), "clients/python/suite.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_kit_client_passes_its_suite() {
    run_suite(&node(), "clients/js/suite.js").await;
}
