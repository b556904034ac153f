//! Writes run in tasks of their own, not in the request's future. axum drops a request's future
//! when its client goes away or times out, at whatever `.await` it has reached; a write cut there
//! would leave a transaction, a savepoint or a lock behind. Detached, an accepted write either
//! completes (and is durable) or, if its client left before it reached the database, never starts.
//!
//! The number of writes in the server at once is bounded: beyond it a write is answered at once
//! with 503 and `Retry-After`, rather than queueing until some timeout gives a 500.
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::{ApiError, ApiResult};

/// How long a write may wait for the database (the SQLite writer, a PostgreSQL connection) before
/// it is answered 503: beyond this the server is overloaded, not slow.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the client that asked for a write is still there.
#[derive(Clone)]
pub struct Liveness(Arc<AtomicBool>);

impl Liveness {
    /// A client that is gone gets nothing started on its behalf.
    pub fn check(&self) -> ApiResult<()> {
        if self.0.load(Ordering::SeqCst) {
            Err(ApiError::ClientGone)
        } else {
            Ok(())
        }
    }
}

/// Marks the client gone when the request's future is dropped before the write answered.
struct GoneOnDrop {
    gone: Arc<AtomicBool>,
    answered: bool,
}

impl Drop for GoneOnDrop {
    fn drop(&mut self) {
        if !self.answered {
            self.gone.store(true, Ordering::SeqCst);
        }
    }
}

/// Admission of writes: at most `limit` in the server at once.
#[derive(Clone)]
pub struct WriteSlots(Arc<Semaphore>);

impl WriteSlots {
    pub fn new(limit: usize) -> WriteSlots {
        WriteSlots(Arc::new(Semaphore::new(limit.max(1))))
    }

    /// Run `work` in a task of its own and wait for its answer. The task holds a slot until it
    /// ends; when none is free the answer is 503 at once.
    pub async fn run<T, F, Fut>(&self, work: F) -> ApiResult<T>
    where
        F: FnOnce(Liveness) -> Fut,
        Fut: Future<Output = ApiResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let slot = self.0.clone().try_acquire_owned().map_err(|_| {
            ApiError::Unavailable("too many writes in progress: retry shortly".into())
        })?;
        let running = crate::observability::metrics::WriteInProgress::enter();
        let gone = Arc::new(AtomicBool::new(false));
        let mut mark = GoneOnDrop {
            gone: gone.clone(),
            answered: false,
        };
        let fut = work(Liveness(gone));
        // the task's span is a child of the request's: a trace shows the write under its request
        let task = tokio::spawn(
            async move {
                let answer = fut.await;
                drop(slot);
                drop(running);
                answer
            }
            .instrument(tracing::info_span!("write")),
        );
        let answer = task.await;
        mark.answered = true;
        match answer {
            Ok(answer) => answer,
            Err(e) => {
                tracing::error!(error = %e, "a write task failed");
                Err(ApiError::Internal("the write failed".into()))
            }
        }
    }
}
