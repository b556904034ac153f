//! Group commit for SQLite. SQLite has one writer and a durable commit costs an fsync (about 2 ms
//! here), which alone would cap the server near 400 write transactions per second. Every write
//! transaction therefore runs as a SAVEPOINT inside one outer transaction on the single write
//! connection; when a transaction commits and nobody else is queued for the writer, the outer
//! transaction is committed (one fsync for the whole group) and every member is told. A member
//! only returns (and the client only gets its 2xx) after that durable commit; a member that fails
//! is rolled back to its savepoint without touching the others.
//!
//! Hand-written: sqlx has no group commit, and its Transaction type cannot nest this way.
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::SqliteConnection;
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot};

use super::{StoreError, StoreResult};

/// Commit at the latest when this many transactions wait for the same fsync.
const MAX_GROUP: usize = 128;

pub struct WriterState {
    conn: SqliteConnection,
    outer_open: bool,
    savepoint_open: bool,
    pending: Vec<oneshot::Sender<Result<(), String>>>,
}

#[derive(Clone)]
pub struct GroupWriter {
    state: Arc<Mutex<WriterState>>,
    /// Transactions queued for the writer: while there are some, a commit leaves the fsync to them.
    waiting: Arc<AtomicUsize>,
}

pub struct GroupTx {
    guard: Option<OwnedMutexGuard<WriterState>>,
    waiting: Arc<AtomicUsize>,
}

async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(conn).await.map(|_| ())
}

/// Undo the open savepoint of a transaction that did not commit.
async fn roll_back_member(s: &mut WriterState) -> Result<(), sqlx::Error> {
    if s.savepoint_open {
        s.savepoint_open = false;
        exec(&mut s.conn, "ROLLBACK TO request").await?;
        exec(&mut s.conn, "RELEASE request").await?;
    }
    Ok(())
}

/// Commit the outer transaction and tell every member of the group how it went.
async fn flush(s: &mut WriterState) {
    if !s.outer_open {
        return;
    }
    let result = exec(&mut s.conn, "COMMIT").await.map_err(|e| e.to_string());
    s.outer_open = false;
    if result.is_err() {
        let _ = exec(&mut s.conn, "ROLLBACK").await;
    }
    for member in s.pending.drain(..) {
        let _ = member.send(result.clone());
    }
}

impl GroupWriter {
    pub fn new(conn: SqliteConnection) -> Self {
        let state = WriterState {
            conn,
            outer_open: false,
            savepoint_open: false,
            pending: Vec::new(),
        };
        GroupWriter {
            state: Arc::new(Mutex::new(state)),
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub async fn begin(&self) -> StoreResult<GroupTx> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.state.clone().lock_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let s = &mut *guard;
        if let Err(e) = roll_back_member(s).await {
            // the connection is in an unknown state: end the group so the next one starts clean
            tracing::error!(error = %e, "savepoint cleanup failed; committing the group early");
            flush(s).await;
        }
        if !s.outer_open {
            exec(&mut s.conn, "BEGIN IMMEDIATE").await?;
            s.outer_open = true;
        }
        exec(&mut s.conn, "SAVEPOINT request").await?;
        s.savepoint_open = true;
        Ok(GroupTx {
            guard: Some(guard),
            waiting: self.waiting.clone(),
        })
    }
}

impl GroupTx {
    pub async fn commit(mut self) -> StoreResult<()> {
        let mut guard = self.guard.take().expect("a transaction commits once");
        let waiting = self.waiting.clone();
        let s = &mut *guard;
        if let Err(e) = exec(&mut s.conn, "RELEASE request").await {
            let _ = roll_back_member(s).await;
            return Err(e.into());
        }
        s.savepoint_open = false;
        let (tx, rx) = oneshot::channel();
        s.pending.push(tx);
        if waiting.load(Ordering::SeqCst) == 0 || s.pending.len() >= MAX_GROUP {
            flush(s).await;
        }
        drop(guard);
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::GroupCommit(e)),
            Err(_) => Err(StoreError::GroupCommit("the group was abandoned".into())),
        }
    }
}

impl Drop for GroupTx {
    /// A transaction dropped without commit (an error, a rejected Bundle): roll its savepoint back,
    /// and commit the group if nobody else is queued to do it.
    fn drop(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            let waiting = self.waiting.clone();
            tokio::spawn(async move {
                let s = &mut *guard;
                if let Err(e) = roll_back_member(s).await {
                    tracing::error!(error = %e, "rollback to savepoint failed");
                }
                if waiting.load(Ordering::SeqCst) == 0 && !s.pending.is_empty() {
                    flush(s).await;
                }
            });
        }
    }
}

impl Deref for GroupTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.guard.as_ref().expect("open transaction").conn
    }
}

impl DerefMut for GroupTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.guard.as_mut().expect("open transaction").conn
    }
}
