//! What every target checks of a rejection: the server answers it with a 4xx and an
//! OperationOutcome that says what is wrong, never with a 5xx or a panic.
#![allow(dead_code)]

use sentinella::error::ApiError;
use serde_json::Value;

/// The stack a request handler runs on: tokio's worker and blocking threads get 2 MiB. The readers
/// recurse (bounded by their nesting limits); running them here on the main thread's 8 MiB would
/// hide an overflow the server would hit.
pub const SERVER_STACK: usize = 2 * 1024 * 1024;

/// Run `f` on a thread with the server's stack size; a panic there aborts the fuzzer as well
/// (libfuzzer-sys installs an aborting panic hook).
pub fn on_server_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("server-stack".into())
            .stack_size(SERVER_STACK)
            .spawn_scoped(s, f)
            .expect("a thread")
            .join()
            .expect("no panic")
    })
}

/// A rejection as the client sees it: a client error, and an OperationOutcome with at least one
/// error issue that has a code and a diagnostic.
pub fn assert_rejected(err: &ApiError, what: &str) {
    let status = err.status();
    assert!(
        status.is_client_error(),
        "{what}: a rejection must be a 4xx, got {status} ({err:?})"
    );
    assert_operation_outcome(&err.outcome(), what);
}

pub fn assert_operation_outcome(body: &Value, what: &str) {
    assert_eq!(
        body["resourceType"], "OperationOutcome",
        "{what}: a rejection must be answered with an OperationOutcome: {body}"
    );
    let issues = body["issue"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: the OperationOutcome has no issue array: {body}"));
    assert!(
        !issues.is_empty(),
        "{what}: the OperationOutcome has no issue: {body}"
    );
    assert!(
        issues.iter().any(|i| i["severity"] == "error"),
        "{what}: a rejection must carry an error issue: {body}"
    );
    for i in issues {
        assert!(
            i["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{what}: an issue without a code: {body}"
        );
        assert!(
            i["diagnostics"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: an issue without diagnostics: {body}"
        );
    }
}
