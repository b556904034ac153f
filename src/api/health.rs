//! Probes for orchestrators (Kubernetes `livenessProbe` / `readinessProbe`): `/healthz` says the
//! process answers; `/readyz` says it can take writes now. A server whose writer is stuck still
//! answers reads and `/metadata`, so readiness writes: a small record through the same transaction
//! path every FHIR write takes (on SQLite the group-commit writer, on PostgreSQL a pooled
//! connection), committed durably within a short bound, and checks that the delivery worker is
//! still going round.
//!
//! Both answer plain JSON (probes read only the status code; people read the body) and need no
//! token: they say nothing but whether the process works, and give no internal detail (the cause is
//! logged).
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::AppState;
use crate::store::SharedStore;
use crate::subscriptions::worker::Heartbeat;

/// A probe write that has not committed by then counts as a writer that cannot write.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Answers within this long of a probe reuse its result: probes from several kubelets, or a client
/// calling in a loop, cost at most one write a second.
const REUSE: Duration = Duration::from_secs(1);
/// On top of the worker's poll interval, how long one delivery round may take before the worker
/// counts as hung.
const WORKER_GRACE: Duration = Duration::from_secs(10);

/// Where the probe's record lives in the rules' state table.
const PROBE_RULE_SET: &str = "health";
const PROBE_KEY: &str = "readyz";

/// What readiness looks at, shared by every request.
pub struct Readiness {
    store: SharedStore,
    /// The delivery worker, in a process that runs one.
    worker: Option<WorkerWatch>,
    last: Mutex<Probe>,
}

struct WorkerWatch {
    heartbeat: Heartbeat,
    task: std::sync::Mutex<JoinHandle<()>>,
    limit: Duration,
}

#[derive(Default)]
struct Probe {
    /// The last answer and when it was made.
    result: Option<(Instant, Result<Duration, &'static str>)>,
    /// A probe write still on its way: a new one is not started behind it, so a stuck writer
    /// collects one waiting probe, not one per request.
    running: Option<JoinHandle<Result<(), String>>>,
}

impl Readiness {
    pub fn new(
        store: SharedStore,
        worker: Heartbeat,
        worker_task: JoinHandle<()>,
        poll: Duration,
    ) -> Arc<Readiness> {
        Arc::new(Readiness {
            store,
            worker: Some(WorkerWatch {
                heartbeat: worker,
                task: std::sync::Mutex::new(worker_task),
                limit: poll + WORKER_GRACE,
            }),
            last: Mutex::new(Probe::default()),
        })
    }

    /// Readiness of a process that delivers nothing (a tool, a benchmark): writes only.
    pub fn writes_only(store: SharedStore) -> Arc<Readiness> {
        Arc::new(Readiness {
            store,
            worker: None,
            last: Mutex::new(Probe::default()),
        })
    }

    /// Stop the delivery worker (a test plays a dead worker with it).
    pub fn stop_worker(&self) {
        if let Some(w) = &self.worker {
            w.task.lock().expect("not poisoned").abort();
        }
    }

    /// `None` when the worker is going round (or the process runs none); else why not.
    fn worker_problem(&self) -> Option<String> {
        let w = self.worker.as_ref()?;
        if w.task.lock().expect("not poisoned").is_finished() {
            return Some("the subscription delivery worker has stopped".into());
        }
        match w.heartbeat.age() {
            // not yet started: the first round begins right after start-up
            None => None,
            Some(age) if age > w.limit => Some(format!(
                "the subscription delivery worker has not gone round for {} s",
                age.as_secs()
            )),
            Some(_) => None,
        }
    }

    /// Write the probe record, or reuse a result younger than a second.
    async fn write_check(&self) -> Result<Duration, &'static str> {
        let mut probe = self.last.lock().await;
        if let Some((at, result)) = &probe.result
            && at.elapsed() < REUSE
        {
            return *result;
        }
        let started = Instant::now();
        let mut running = match probe.running.take() {
            Some(task) if !task.is_finished() => {
                probe.running = Some(task);
                let r = Err("a previous probe write is still waiting for the database");
                probe.result = Some((Instant::now(), r));
                return r;
            }
            _ => {
                // detached: a probe cut off by its request's end would leave nothing behind
                // anyway, but the next request must see whether it ever finished
                let store = self.store.clone();
                tokio::spawn(async move { probe_write(&store).await })
            }
        };
        let result = match tokio::time::timeout(PROBE_TIMEOUT, &mut running).await {
            Ok(Ok(Ok(()))) => Ok(started.elapsed()),
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "readiness: the probe write failed");
                Err("the database refused a write")
            }
            Ok(Err(_)) => Err("the probe write did not complete"),
            Err(_) => Err("a write did not commit in time"),
        };
        if !running.is_finished() {
            probe.running = Some(running);
        }
        probe.result = Some((Instant::now(), result));
        result
    }
}

/// One small durable write through the write path every FHIR write takes.
async fn probe_write(store: &SharedStore) -> Result<(), String> {
    let mut tx = store.begin().await.map_err(|e| e.to_string())?;
    let at = crate::fhir::datetime::now_micros();
    tx.state_put(PROBE_RULE_SET, PROBE_KEY, &json!({ "at": at }), &[])
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())
}

/// `GET /healthz`: the process is up and answering.
pub async fn healthz() -> Response {
    (StatusCode::OK, Json(json!({ "status": "pass" }))).into_response()
}

/// `GET /readyz`: 200 when a write commits within `PROBE_TIMEOUT` and the delivery worker is
/// going round; 503 (with the failed checks) otherwise.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = &state.readiness;
    let write = readiness.write_check().await;
    let worker = readiness.worker_problem();
    let ok = write.is_ok() && worker.is_none();
    let body = json!({
        "status": if ok { "pass" } else { "fail" },
        "checks": {
            "database:write": match write {
                Ok(took) => json!({ "status": "pass", "observedValue": took.as_secs_f64() * 1e3, "observedUnit": "ms" }),
                Err(why) => json!({ "status": "fail", "output": why }),
            },
            "subscriptions:delivery-worker": match &worker {
                None => json!({ "status": "pass" }),
                Some(why) => json!({ "status": "fail", "output": why }),
            },
        }
    });
    if !ok {
        tracing::warn!(?write, ?worker, "not ready");
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    r
}
