//! Starting and stopping the server: database, warm-up, listener, graceful shutdown.
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::api::{AppState, router};
use crate::auth::Access;
use crate::config::Config;
use crate::fhir::Definitions;
use crate::fhir::schema::SchemaValidators;
use crate::store;
use crate::subscriptions::channel::Channels;
use crate::subscriptions::dispatch::Dispatcher;
use crate::subscriptions::worker::Worker;
use crate::surveillance::Engine;
use crate::terminology::Terminology;

/// Open the database (running migrations), load the rules and build the application router.
pub async fn build_app(config: Config) -> anyhow::Result<Router> {
    Ok(router(build_state(config).await?))
}

/// Everything the router serves from: the database, the rules, the background tasks (delivery,
/// audit, summaries) started.
pub async fn build_state(config: Config) -> anyhow::Result<AppState> {
    let store = store::connect(&config.database).await?;
    let access = Arc::new(match &config.access_file {
        Some(path) => {
            let a = Access::load(path)?;
            tracing::info!(path, "access configuration loaded: bearer tokens required");
            a
        }
        None => {
            tracing::warn!(
                "DEVELOPMENT MODE: no --config access file, so every request acts as a single \
                 administrator without a token and subscriptions may use any endpoint; \
                 do not expose this server"
            );
            Access::development()
        }
    });
    // check every topic file now rather than at the first event
    let topics = crate::subscriptions::topics::topics().len();
    let dispatcher = Arc::new(Dispatcher::new(access.clone(), config.nats_url.is_some()));
    let engine = Arc::new(
        Engine::new(config.eucast_version.as_deref(), dispatcher.clone())
            .map_err(anyhow::Error::msg)?,
    );
    let dm1990 = Arc::new(
        crate::surveillance::dm1990::Dm1990::new(dispatcher.clone()).map_err(anyhow::Error::msg)?,
    );
    // the rules every write transaction runs before it commits, in this order
    store.install_hooks(Arc::new([
        Arc::new(crate::subscriptions::SubscriptionHook {
            dispatcher: dispatcher.clone(),
        }) as Arc<dyn crate::store::PreCommit>,
        engine.clone(),
        dm1990.clone(),
    ]));
    // cases decided before the case register existed are added to it once per database
    crate::surveillance::backfill::spawn(store.clone(), dm1990.clone());
    let base = config
        .base_url
        .clone()
        .unwrap_or_else(|| format!("http://{}/fhir", config.listen));
    let audit = crate::audit::AuditLog::start(store.clone(), config.audit_retention());
    let worker = Arc::new(
        Worker::new(
            store::connect_for_delivery(&config.database, &store).await?,
            Channels::new(config.nats_url.clone()),
            config.delivery(),
            base.trim_end_matches('/').to_string(),
            dispatcher.waker(),
        )
        .audited(audit.clone()),
    );
    tracing::info!(topics, "subscription topics loaded");
    tracing::info!(
        measures = crate::measures::definition::measures().len(),
        "summary measures loaded"
    );
    if config.summary_every_minutes > 0 {
        crate::measures::generate::spawn_schedule(
            store.clone(),
            dispatcher.clone(),
            Duration::from_secs(config.summary_every_minutes.saturating_mul(60)),
        );
    }
    let readiness = crate::api::health::Readiness::new(
        store.clone(),
        worker.heartbeat(),
        tokio::spawn(worker.clone().run()),
        worker.beat_interval(),
    );
    tracing::info!(
        case_definition = %engine.definition.canonical(),
        eucast = %engine.breakpoints.version,
        local_code_systems = Terminology::get().local_systems().count(),
        "surveillance rules loaded"
    );
    // parse definitions and compile every schema validator before the first request
    tokio::task::spawn_blocking(|| {
        let (checked, skipped) = Definitions::get().structures.invariant_counts();
        tracing::info!(
            checked,
            skipped,
            "R4 invariants: checked, and outside the supported FHIRPath subset"
        );
        SchemaValidators::get().warm_up();
        // the expanded value sets and concept maps of the terminology operations, and the
        // conformance resources served read-only
        crate::terminology::operations::warm_up();
        let served = crate::conformance::Conformance::get().counts();
        tracing::info!(?served, "conformance resources served");
    })
    .await
    .expect("warm-up does not panic");
    let config_writes = config.max_writes_in_flight;
    let config_rate = config.rate_limit_per_second;
    Ok(AppState {
        store,
        config: Arc::new(config),
        engine,
        access,
        writes: crate::api::write_task::WriteSlots::new(config_writes),
        audit,
        rate_limits: crate::api::rate_limit::RateLimits::new(config_rate),
        readiness,
    })
}

/// Serve until SIGINT or SIGTERM; in-flight requests finish before the process exits.
pub async fn serve(mut config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    // the real port (when 0 was asked) names this server in notifications
    config.listen = listener.local_addr()?;
    let database = redact(&config.database);
    let limits = ConnectionLimits {
        max_connections: config.max_connections.max(1),
        header_timeout: Duration::from_secs(config.header_timeout_secs.max(1)),
    };
    let app = build_app(config).await?;
    tracing::info!(address = %listener.local_addr()?, %database, "Sentinella FHIR server listening on /fhir");
    accept_loop(listener, app, limits).await;
    tracing::info!("shut down cleanly");
    Ok(())
}

struct ConnectionLimits {
    max_connections: usize,
    header_timeout: Duration,
}

/// Accept connections until shutdown, at most `max_connections` open at once (a client cannot run
/// the process out of file descriptors), each closed when its headers (or, between requests, the
/// next request's) take longer than `header_timeout`. Hand-written around hyper-util because
/// `axum::serve` sets neither; in-flight requests finish before it returns.
async fn accept_loop(listener: TcpListener, app: axum::Router, limits: ConnectionLimits) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // out of descriptors or a reset handshake: wait a moment, keep serving
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_byte = limits.header_timeout;
        tokio::spawn(async move {
            // the protocol is detected from the first bytes, before hyper's header timer runs: a
            // connection that sends nothing at all is closed here
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte, stream.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested: finishing in-flight requests");
}
