//! Group commit for SQLite. SQLite has one writer and a durable commit costs an fsync (about 2 ms
//! here), which alone would cap the server near 400 write transactions per second. Every write
//! transaction therefore runs as a SAVEPOINT inside one outer transaction on the single write
//! connection; the outer transaction is committed (one fsync for the whole group) when nobody else
//! is queued for the writer, when the group is full, or when its oldest member has waited long
//! enough, and every member is told. A member only returns (and the client only gets its 2xx)
//! after that durable commit; a member that fails is rolled back to its savepoint without touching
//! the others.
//!
//! The fsync happens outside the writer's turn: the writer connection runs with
//! `synchronous=NORMAL` (in WAL mode a COMMIT then only appends to the write-ahead log) and the
//! group's members are told only after an `fdatasync` of the log file that started after their
//! COMMIT returned, so a 2xx still means on disk, while the next group already runs. (SQLite syncs
//! the log itself before every checkpoint, so frames are never checkpointed unsynced.)
//!
//! Cancellation: the API runs writes in tasks of their own, so a client that goes away does not
//! interrupt them; still, nothing here depends on a future running to its end. The queue counter
//! is a guard, a statement that changes the transaction state marks the state "in doubt" until it
//! returns (a dropped future leaves the mark, and the next holder of the writer repairs the
//! connection from what SQLite says), and a member waiting for its group's commit commits the group
//! itself when nobody has within the time bound.
//!
//! Hand-written: sqlx has no group commit, and its Transaction type cannot nest this way.
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::SqliteConnection;
use tokio::sync::mpsc::{self, error::SendError};
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot, watch};

use super::{StoreError, StoreResult};

/// Commit at the latest when this many transactions wait for the same fsync…
const MAX_GROUP: usize = 64;
/// …or when the group's first member has waited this long (p99 under open load).
const MAX_GROUP_WAIT: Duration = Duration::from_millis(4);

type Outcome = Result<(), String>;

pub struct WriterState {
    conn: SqliteConnection,
    outer_open: bool,
    savepoint_open: bool,
    /// A statement that opens or ends a transaction or savepoint was started and has not been
    /// seen to return: what the connection holds must be asked, not assumed.
    in_doubt: bool,
    /// Members whose savepoint was released, waiting for the outer commit.
    pending: Vec<oneshot::Sender<Outcome>>,
    /// When the first member of the open group released its savepoint.
    group_since: Option<Instant>,
    /// Counts committed groups (`GroupWriter::durable` waits for the log sync of the latest).
    groups: u64,
    wal: WalFile,
    /// Where committed groups wait for their log sync.
    syncer: mpsc::UnboundedSender<SyncRequest>,
    committed: Arc<std::sync::atomic::AtomicU64>,
}

/// The write-ahead log, opened for `fdatasync` (reopened if SQLite ever made a new one).
struct WalFile {
    /// `None` for an in-memory database: nothing to sync.
    path: Option<PathBuf>,
    open: Option<(std::fs::File, u64)>,
}

impl WalFile {
    fn new(database: &std::path::Path) -> WalFile {
        let memory =
            database.as_os_str().is_empty() || database == std::path::Path::new(":memory:");
        WalFile {
            path: (!memory).then(|| {
                let mut p = database.as_os_str().to_owned();
                p.push("-wal");
                PathBuf::from(p)
            }),
            open: None,
        }
    }

    /// A handle on the current log file (the same inode SQLite writes to), or `None` in memory.
    fn handle(&mut self) -> std::io::Result<Option<std::fs::File>> {
        use std::os::unix::fs::MetadataExt;
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let inode = std::fs::metadata(path)?.ino();
        if self.open.as_ref().is_none_or(|(_, i)| *i != inode) {
            self.open = Some((std::fs::File::open(path)?, inode));
        }
        let (file, _) = self.open.as_ref().expect("opened above");
        Ok(Some(file.try_clone()?))
    }
}

#[derive(Clone)]
pub struct GroupWriter {
    state: Arc<Mutex<WriterState>>,
    /// Groups committed (visible to readers) and groups known to be on disk.
    committed: Arc<std::sync::atomic::AtomicU64>,
    synced: watch::Sender<u64>,
    /// Transactions queued for the writer: while there are some, a commit leaves the fsync to them.
    waiting: Arc<AtomicUsize>,
}

pub struct GroupTx {
    guard: Option<OwnedMutexGuard<WriterState>>,
    writer: GroupWriter,
    /// When this transaction got the writer (its turn's length is logged at debug level).
    since: Instant,
}

/// Counts a transaction as queued for the writer for as long as it lives (a dropped future
/// included).
struct Queued(Arc<AtomicUsize>);

impl Queued {
    fn enter(counter: &Arc<AtomicUsize>) -> Queued {
        counter.fetch_add(1, Ordering::SeqCst);
        crate::observability::metrics::writer_queue(1.0);
        Queued(counter.clone())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        crate::observability::metrics::writer_queue(-1.0);
    }
}

async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(conn).await.map(|_| ())
}

/// Run a statement that changes the transaction state, marking the state in doubt while it runs.
async fn step(s: &mut WriterState, sql: &'static str) -> Result<(), sqlx::Error> {
    s.in_doubt = true;
    let r = exec(&mut s.conn, sql).await;
    s.in_doubt = false;
    r
}

fn tell(pending: Vec<oneshot::Sender<Outcome>>, outcome: &Outcome) {
    for member in pending {
        let _ = member.send(outcome.clone());
    }
}

/// Bring the connection back to a known state after an interrupted statement or member: no
/// savepoint open, and the outer transaction either open with its pending members intact or
/// ended with every pending member told how it ended.
async fn repair(s: &mut WriterState) {
    if s.in_doubt {
        s.in_doubt = false;
        // BEGIN fails inside a transaction: that tells whether one is open
        let open = exec(&mut s.conn, "BEGIN IMMEDIATE").await.is_err();
        if open {
            // an interrupted member or BEGIN/SAVEPOINT/RELEASE: nothing of this group is
            // durable, so all of it goes and its members hear so
            let r = exec(&mut s.conn, "ROLLBACK").await;
            tracing::error!(
                ok = r.is_ok(),
                "writer repaired: the open group was rolled back"
            );
            tell(
                std::mem::take(&mut s.pending),
                &Err("the write was interrupted".into()),
            );
        } else {
            // no transaction was open: the interrupted statement was the group's COMMIT, which
            // completed (a failed COMMIT leaves the transaction open)
            let _ = exec(&mut s.conn, "ROLLBACK").await;
            tracing::warn!("writer repaired: an interrupted group commit had completed");
            tell(std::mem::take(&mut s.pending), &Ok(()));
        }
        s.outer_open = false;
        s.savepoint_open = false;
        s.group_since = None;
        s.groups += 1;
        return;
    }
    if s.savepoint_open {
        s.savepoint_open = false;
        let undone = async {
            step(s, "ROLLBACK TO request").await?;
            step(s, "RELEASE request").await
        }
        .await;
        if let Err(e) = undone {
            tracing::error!(error = %e, "savepoint rollback failed; repairing the writer");
            s.in_doubt = true;
            Box::pin(repair(s)).await;
        }
    }
}

/// Nobody is queued for the writer: commit the open group if it has members, else end the empty
/// outer transaction. Left open, an empty one would hold SQLite's write lock while the writer is
/// idle, and every other process on the file (a second server, `sentinella import`, the
/// `/readyz` of another process) would wait for it until the next write here.
async fn settle(s: &mut WriterState) {
    if !s.pending.is_empty() {
        flush(s).await;
    } else if s.outer_open && !s.savepoint_open {
        match step(s, "ROLLBACK").await {
            Ok(()) => {
                s.outer_open = false;
                s.group_since = None;
            }
            // what the connection holds is asked by the next holder of the writer
            Err(_) => s.in_doubt = true,
        }
    }
}

/// Commit the outer transaction and tell every member of the group how it went, once the log is
/// on disk (the sync runs outside the writer's turn).
async fn flush(s: &mut WriterState) {
    if !s.outer_open {
        return;
    }
    let started = Instant::now();
    crate::observability::metrics::commit_group(s.pending.len());
    let result = step(s, "COMMIT").await.map_err(|e| e.to_string());
    tracing::debug!(
        members = s.pending.len(),
        group_ms = s
            .group_since
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
        commit_ms = started.elapsed().as_secs_f64() * 1e3,
        "group committed"
    );
    if result.is_err() {
        let _ = step(s, "ROLLBACK").await;
    }
    s.outer_open = false;
    s.group_since = None;
    s.groups += 1;
    s.committed.store(s.groups, Ordering::SeqCst);
    let pending = std::mem::take(&mut s.pending);
    if let Err(e) = result {
        tell(pending, &Err(e));
        return;
    }
    let wal = s.wal.handle();
    if let Err(SendError((pending, _, _))) = s.syncer.send((pending, wal, s.groups)) {
        tell(pending, &Err("the log syncer stopped".into()));
    }
}

type SyncRequest = (
    Vec<oneshot::Sender<Outcome>>,
    std::io::Result<Option<std::fs::File>>,
    u64,
);

/// One `fdatasync` at a time: while one runs, the groups that commit meanwhile wait for the next,
/// which covers them all (many concurrent syncs of one file each cost the disk a journal commit).
fn spawn_syncer(on_disk: watch::Sender<u64>) -> mpsc::UnboundedSender<SyncRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<SyncRequest>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            // the newest handle: its sync covers every frame written before it started
            let file = batch
                .last_mut()
                .map(|(_, f, _)| std::mem::replace(f, Ok(None)));
            let newest = batch.last().map_or(0, |(_, _, g)| *g);
            let synced = tokio::task::spawn_blocking(move || match file {
                Some(Ok(Some(file))) => file.sync_data(),
                Some(Err(e)) => Err(e),
                _ => Ok(()),
            })
            .await;
            let outcome = match synced {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "fdatasync of the SQLite log failed");
                    Err(format!("the commit could not be made durable: {e}"))
                }
                Err(e) => Err(format!("the commit could not be made durable: {e}")),
            };
            if outcome.is_ok() {
                on_disk.send_if_modified(|v| {
                    let newer = newest > *v;
                    *v = (*v).max(newest);
                    newer
                });
            }
            for (members, _, _) in batch {
                tell(members, &outcome);
            }
        }
    });
    tx
}

impl GroupWriter {
    /// `conn` must run with `synchronous=NORMAL` in WAL mode on the database file `database`.
    pub fn new(conn: SqliteConnection, database: &std::path::Path) -> Self {
        let committed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let synced = watch::Sender::new(0);
        let state = WriterState {
            conn,
            outer_open: false,
            savepoint_open: false,
            in_doubt: false,
            pending: Vec::new(),
            group_since: None,
            groups: 0,
            wal: WalFile::new(database),
            syncer: spawn_syncer(synced.clone()),
            committed: committed.clone(),
        };
        GroupWriter {
            state: Arc::new(Mutex::new(state)),
            committed,
            synced,
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Wait until everything committed so far is on disk. Readers see a group from its COMMIT,
    /// a moment before its sync: what leaves the server (a delivered event) waits for this.
    pub async fn durable(&self) {
        let target = self.committed.load(Ordering::SeqCst);
        let mut synced = self.synced.subscribe();
        let _ = synced.wait_for(|v| *v >= target).await;
    }

    /// Transactions waiting for the writer now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub async fn begin(&self) -> StoreResult<GroupTx> {
        let queued = Queued::enter(&self.waiting);
        let mut guard = self.state.clone().lock_owned().await;
        drop(queued);
        let s = &mut *guard;
        repair(s).await;
        if !s.outer_open {
            step(s, "BEGIN IMMEDIATE").await?;
            s.outer_open = true;
        }
        step(s, "SAVEPOINT request").await?;
        s.savepoint_open = true;
        Ok(GroupTx {
            guard: Some(guard),
            writer: self.clone(),
            since: Instant::now(),
        })
    }

    /// Commit the open group now if it has members (a member waited the bound: its own group,
    /// or the one that formed while its own waits for its log sync).
    async fn commit_open_group(&self) {
        let mut guard = self.state.lock().await;
        let s = &mut *guard;
        repair(s).await;
        if !s.pending.is_empty() {
            flush(s).await;
        }
    }
}

impl GroupTx {
    pub async fn commit(mut self) -> StoreResult<()> {
        let mut guard = self.guard.take().expect("a transaction commits once");
        let writer = self.writer.clone();
        let s = &mut *guard;
        if let Err(e) = step(s, "RELEASE request").await {
            repair(s).await;
            if writer.queued() == 0 {
                settle(s).await;
            }
            return Err(e.into());
        }
        s.savepoint_open = false;
        tracing::debug!(
            turn_ms = self.since.elapsed().as_secs_f64() * 1e3,
            queued = writer.queued(),
            "transaction released"
        );
        let (tx, mut rx) = oneshot::channel();
        s.pending.push(tx);
        let since = *s.group_since.get_or_insert_with(Instant::now);
        if writer.queued() == 0 || s.pending.len() >= MAX_GROUP || since.elapsed() >= MAX_GROUP_WAIT
        {
            flush(s).await;
        }
        drop(guard);
        let answer = loop {
            match tokio::time::timeout(MAX_GROUP_WAIT, &mut rx).await {
                Ok(answer) => break answer,
                // nobody committed the group in time (whoever was queued went away or is slow):
                // commit it ourselves. Once ours is committed and waits for its log sync, the
                // group that formed meanwhile is committed too rather than left to wait for a
                // member to notice its age (measured: ~25% more Bundles/s with 32 clients)
                Err(_) => {
                    writer.commit_open_group().await;
                }
            }
        };
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::GroupCommit(e)),
            Err(_) => Err(StoreError::GroupCommit("the group was abandoned".into())),
        }
    }
}

impl Drop for GroupTx {
    /// A transaction dropped without commit (an error, a rejected Bundle, a dropped future): roll
    /// its savepoint back, and commit the group if nobody else is queued to do it.
    fn drop(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            let waiting = self.writer.waiting.clone();
            let cleanup = async move {
                let s = &mut *guard;
                repair(s).await;
                if waiting.load(Ordering::SeqCst) == 0 {
                    settle(s).await;
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(cleanup);
                }
                // no runtime (process end): the guard goes with the future, and the next holder
                // of the writer, if any, repairs the savepoint it finds open
                Err(_) => drop(cleanup),
            }
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
