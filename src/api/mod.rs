//! The HTTP API: the FHIR REST routes under `/fhir`.
pub mod audit_trail;
pub mod bundle;
pub mod conformance;
pub mod crud;
pub mod dashboard;
pub mod format;
pub mod health;
pub mod history;
pub mod interactions;
pub mod measure;
pub mod metadata;
pub mod metrics;
pub mod parameters;
pub mod patch;
pub mod policy;
pub mod rate_limit;
pub mod responses;
pub mod search;
pub mod subscription_ops;
pub mod summary;
pub mod terminology;
pub mod token;
pub mod validate;
pub mod write_task;
pub mod write_tx;
pub mod xml;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::auth::{Access, Principal};
use crate::config::Config;
use crate::error::{ApiError, ApiResult};
use crate::observability::traces;
use crate::store::SharedStore;
use crate::surveillance::Engine;
use write_task::Liveness;

#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub config: Arc<Config>,
    pub engine: Arc<Engine>,
    pub access: Arc<Access>,
    /// Writes run detached from their requests, a bounded number at once.
    pub writes: write_task::WriteSlots,
    /// The audit trail every access to case data is recorded in.
    pub audit: crate::audit::AuditLog,
    /// Each client's request rate.
    pub rate_limits: rate_limit::RateLimits,
    /// What `/readyz` checks: a probe write and the delivery worker.
    pub readiness: Arc<health::Readiness>,
}

impl AppState {
    /// A write transaction for `caller`; the surveillance rules run on what it wrote before it
    /// commits, and what it may write is checked as it writes. Nothing starts for a client that
    /// is gone; a database that cannot be had in time is a 503.
    pub async fn begin(&self, caller: &Caller, live: &Liveness) -> ApiResult<write_tx::WriteTx> {
        live.check()?;
        let inner = tokio::time::timeout(write_task::QUEUE_TIMEOUT, self.store.begin())
            .await
            .map_err(|_| crate::store::StoreError::Busy)??;
        Ok(write_tx::WriteTx::new(
            inner,
            caller.0.clone(),
            self.engine.dispatcher.has_broker,
        ))
    }
}

/// The authenticated client of a request (set by the `authenticate` middleware).
#[derive(Clone)]
pub struct Caller(pub Arc<Principal>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("authentication required".into()))
    }
}

impl Caller {
    /// A read of a resource outside the caller's scope is answered as if it did not exist.
    pub fn check_sees(&self, stored: &crate::store::StoredResource) -> ApiResult<()> {
        let body = crate::subscriptions::parse_body(stored.body.as_deref());
        match body {
            Some(b) if !self.0.sees(&b) => Err(ApiError::NotFound(format!(
                "{}/{} is not known",
                stored.resource_type, stored.id
            ))),
            _ => Ok(()),
        }
    }
}

/// Authenticate every request but the CapabilityStatement; what the client may do is decided once
/// the request is routed (`policy::authorize`).
async fn authenticate(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = req.uri().path().to_string();
    let rest = path
        .strip_prefix("/fhir")
        .unwrap_or(&path)
        .trim_matches('/');
    // the OAuth endpoints are how a client gets a token
    if rest == "metadata"
        || path == token::TOKEN_PATH
        || rest == ".well-known/smart-configuration"
        || path == "/healthz"
        || path == "/readyz"
        // the dashboard authenticates itself (bearer or its own session cookie: `dashboard::session`)
        || path == "/dashboard"
        || path.starts_with("/dashboard/")
    {
        return next.run(req).await;
    }
    let principal = if state.access.is_development() {
        Arc::new(Principal::development())
    } else {
        let token = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        let required = || {
            ApiError::Unauthorized(
                "a valid bearer token is required (Authorization: Bearer …)".into(),
            )
            .into_response()
        };
        let Some(token) = token else {
            return required();
        };
        // a static token of the access file, else a JWT (ours, or a trusted issuer's)
        let ctx = crate::auth::BearerContext {
            secret: crate::auth::smart::token_key(
                state.config.token_secret.as_ref().map(|s| s.as_bytes()),
            ),
            fhir_base: &token::fhir_base(&state.config, req.headers()),
        };
        match state.access.authenticate_bearer(token.trim(), ctx).await {
            Ok(p) => p,
            Err(crate::auth::BearerError::Unknown) => return required(),
            Err(crate::auth::BearerError::Invalid(why)) => {
                // RFC 6750 §3.1; the reason, never the token
                let mut r = ApiError::Unauthorized(format!("the bearer token is not valid: {why}"))
                    .into_response();
                r.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static(
                        "Bearer realm=\"sentinella\", error=\"invalid_token\"",
                    ),
                );
                return r;
            }
        }
    };
    req.extensions_mut().insert(Caller(principal));
    next.run(req).await
}

/// A handler that panicked: a generic OperationOutcome with a reference; the detail is logged.
fn panic_answer(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    let reference = crate::error::correlation_id();
    tracing::error!(panic = detail, %reference, "request handler panicked");
    format::fhir_json(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        &crate::error::internal_outcome(&reference),
    )
    .into_response()
}

/// 404 for a type the server does not serve (FHIR: unknown resource type).
pub fn require_type(rt: &str) -> ApiResult<()> {
    if crate::fhir::is_served(rt) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "resource type '{rt}' is not supported by this server (see /fhir/metadata)"
        )))
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no FHIR endpoint at {uri}"))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("this method is not supported on this URL".into())
}

/// The conformance resources (read-only: they are data of the repository; other methods answer
/// 405) and the terminology operations over them.
fn conformance_routes() -> Router<AppState> {
    let mut r = Router::new();
    for t in crate::conformance::SERVED_CONFORMANCE_TYPES {
        r = r
            .route(&format!("/{t}"), get(conformance::search))
            .route(&format!("/{t}/{{id}}"), get(conformance::read));
    }
    r.route(
        "/CodeSystem/$lookup",
        get(terminology::lookup).post(terminology::lookup),
    )
    .route(
        "/CodeSystem/$subsumes",
        get(terminology::subsumes).post(terminology::subsumes),
    )
    .route(
        "/CodeSystem/{id}/$subsumes",
        get(terminology::subsumes_instance).post(terminology::subsumes_instance),
    )
    .route(
        "/ValueSet/$expand",
        get(terminology::expand).post(terminology::expand),
    )
    .route(
        "/ValueSet/{id}/$expand",
        get(terminology::expand_instance).post(terminology::expand_instance),
    )
    .route(
        "/ValueSet/$validate-code",
        get(terminology::validate_code).post(terminology::validate_code),
    )
    .route(
        "/ValueSet/{id}/$validate-code",
        get(terminology::validate_code_instance).post(terminology::validate_code_instance),
    )
    .route(
        "/ConceptMap/$translate",
        get(terminology::translate).post(terminology::translate),
    )
    .route(
        "/ConceptMap/{id}/$translate",
        get(terminology::translate_instance).post(terminology::translate_instance),
    )
}

pub fn router(state: AppState) -> Router {
    let fhir = Router::new()
        .route("/", post(bundle::process))
        .route("/metadata", get(metadata::metadata))
        .route("/_history", get(history::system))
        .route(
            "/{type}",
            get(search::search_type)
                .post(crud::create)
                .put(crud::conditional_update)
                .delete(crud::conditional_delete),
        )
        .route("/{type}/_search", post(search::search_post))
        .route("/{type}/_history", get(history::type_level))
        .route(
            "/{type}/{id}",
            get(crud::read)
                .put(crud::update)
                .delete(crud::delete)
                .patch(patch::patch),
        )
        .route("/{type}/$validate", post(validate::validate_type))
        .route("/{type}/{id}/$validate", post(validate::validate_instance))
        .route("/{type}/{id}/_history", get(history::instance))
        .route("/{type}/{id}/_history/{vid}", get(crud::vread))
        // Measures are data of the repository: read-only (other methods answer 405)
        .route("/Measure", get(measure::search))
        .route("/Measure/{id}", get(measure::read))
        .route(
            "/Measure/$evaluate-measure",
            get(measure::evaluate_type).post(measure::evaluate_type),
        )
        .route(
            "/Measure/{id}/$evaluate-measure",
            get(measure::evaluate_instance).post(measure::evaluate_instance),
        )
        .route(
            "/MeasureReport/$generate-reports",
            post(measure::generate_reports),
        )
        .merge(conformance_routes())
        .route("/Subscription/$status", get(subscription_ops::status_type))
        .route("/Subscription/{id}/$status", get(subscription_ops::status))
        .route("/Subscription/{id}/$events", get(subscription_ops::events))
        // inner layer first: only what the policy let through is audited
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit_trail::record,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            policy::authorize,
        ))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found);
    // the base with a trailing slash, where fhirpy and fhir-kit-client post their Bundles: the
    // same handler behind the same policy and audit (a nested "/" matches `/fhir` only)
    let base_with_slash = Router::new()
        .route("/fhir/", post(bundle::process))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit_trail::record,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            policy::authorize,
        ))
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest("/fhir", fhir)
        .merge(base_with_slash)
        // SMART Backend Services: no bearer token needed here (see `authenticate`)
        .route(token::TOKEN_PATH, post(token::token))
        .route(
            "/.well-known/smart-configuration",
            get(token::smart_configuration),
        )
        .route(
            "/fhir/.well-known/smart-configuration",
            get(token::smart_configuration),
        )
        // process health, for probes: no token (see `authenticate`)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        // Prometheus metrics: monitoring clients and admins (see `policy::authorize_metrics`)
        .route("/metrics", metrics::route())
        // D: routes
        .merge(dashboard::routes())
        .fallback(not_found)
        // once the client is known: its rate, then (outer) who it is
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            rate_limit::limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::middleware::from_fn(xml::respond_in_xml_when_asked))
        // a body that stops arriving fails its request instead of holding it (and its slot) open
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_secs(state.config.body_timeout_secs.max(1)),
        ))
        .layer(CatchPanicLayer::custom(panic_answer))
        // a span per request: route pattern, method, status; never the URL (see `traces`)
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(traces::request_span)
                .on_response(traces::record_response),
        )
        // outermost: counts every answer, a refusal or a panic included
        .layer(axum::middleware::from_fn(metrics::record))
        .with_state(state)
}
