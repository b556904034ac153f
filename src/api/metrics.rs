//! `GET /metrics` (Prometheus text exposition) and the middleware that counts and times every HTTP
//! request. Who may scrape is decided in `policy::authorize_metrics`.
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};

use super::AppState;
use crate::error::ApiResult;
use crate::observability::metrics::{self as m, OutboxGauge};

/// Per-subscription series in one scrape at most (the most backlogged first); the count of live
/// subscriptions is reported whole.
pub const MAX_SUBSCRIPTION_SERIES: i64 = 500;

/// The route label of a request the router matched no route for: one fixed value, so unknown
/// paths cannot each make a series.
pub const UNMATCHED: &str = "unmatched";

/// The Prometheus exposition: the process-wide metrics, then the per-subscription outbox gauges
/// read from the database now.
pub async fn scrape(State(state): State<AppState>) -> ApiResult<Response> {
    let (backlog, live) = state.store.outbox_backlog(MAX_SUBSCRIPTION_SERIES).await?;
    let now = now_micros();
    let rows: Vec<OutboxGauge> = backlog
        .into_iter()
        .map(|b| OutboxGauge {
            topic: topic_name(&b.topic).to_string(),
            status: b.status,
            depth: b.depth.max(0),
            oldest_age_secs: b
                .oldest_occurred_at
                .map_or(0.0, |t| (now - t).max(0) as f64 / 1e6),
            subscription: b.subscription_id,
        })
        .collect();
    let mut body = m::render();
    body.push_str(&m::render_outbox(
        &rows,
        usize::try_from(live).unwrap_or_default(),
    ));
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response())
}

/// The last segment of a topic's canonical URL (`…/SubscriptionTopic/cre-case` → `cre-case`).
fn topic_name(canonical: &str) -> &str {
    canonical.rsplit('/').next().unwrap_or(canonical)
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Count and time every request by its route pattern (`MatchedPath`: the router put it there
/// before this layer runs, since `Router::layer` wraps each route), method and status.
pub async fn record(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_string(), |p| p.as_str().to_string());
    let method = req.method().clone();
    let response = next.run(req).await;
    m::record_request(
        &route,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// The `/metrics` route behind its policy. Building it installs the recorder, so what happens
/// before the first scrape is counted too.
pub fn route() -> MethodRouter<AppState> {
    m::install();
    get(scrape).route_layer(axum::middleware::from_fn(super::policy::authorize_metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_named_by_their_last_segment() {
        assert_eq!(
            topic_name("https://sentinella-fhir.github.io/ig/SubscriptionTopic/cre-case"),
            "cre-case"
        );
        assert_eq!(topic_name("plain"), "plain");
    }
}
