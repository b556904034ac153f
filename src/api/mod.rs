//! The HTTP API: the FHIR REST routes under `/fhir`.
pub mod bundle;
pub mod crud;
pub mod format;
pub mod history;
pub mod interactions;
pub mod metadata;
pub mod responses;
pub mod search;
pub mod xml;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::error::{ApiError, ApiResult};
use crate::store::{SharedStore, StoreTx};
use crate::surveillance::{Engine, SurveillanceTx};

#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub config: Arc<Config>,
    pub engine: Arc<Engine>,
}

impl AppState {
    /// A write transaction; the surveillance rules run on what it wrote before it commits.
    pub async fn begin(&self) -> ApiResult<Box<dyn StoreTx>> {
        let inner = self.store.begin().await?;
        Ok(SurveillanceTx::wrap(inner, self.engine.clone()))
    }
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
            get(crud::read).put(crud::update).delete(crud::delete),
        )
        .route("/{type}/{id}/_history", get(history::instance))
        .route("/{type}/{id}/_history/{vid}", get(crud::vread))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found);
    Router::new()
        .nest("/fhir", fhir)
        .fallback(not_found)
        .layer(axum::middleware::from_fn(xml::respond_in_xml_when_asked))
        .layer(CatchPanicLayer::new())
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
