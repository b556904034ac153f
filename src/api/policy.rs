//! Who may do what, decided in one place for every route, from the request as the router decoded
//! it: the matched route pattern and its path parameters (a type written `Communi%63ation` is
//! `Communication` here, as the handler will see it). Finer rules — regions, owners — apply where
//! resources are read and written (`Principal::sees`, `scope`, `WriteTx::admit`), and Bundle entries
//! are checked one by one as they run.
use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, Caller};
use crate::auth::{Principal, Role};
use crate::error::ApiError;

const TERMINOLOGY_OPERATIONS: &[&str] = &[
    "/$lookup",
    "/$subsumes",
    "/$expand",
    "/$validate-code",
    "/$translate",
];

/// What a routed request does to which resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The CapabilityStatement, or a Bundle whose entries are decided as they run.
    Open,
    Read(String),
    Write(String),
    /// System history: every type at once.
    ReadAll,
}

/// The action of a routed request: `route` is the matched pattern below `/fhir`, `rt` the decoded
/// `{type}` parameter if the route has one.
pub fn action(method: &Method, route: &str, rt: Option<&str>) -> Action {
    // operations on Measures read or write summaries, whatever the method carries the parameters
    if route.ends_with("/$evaluate-measure") {
        return Action::Read("MeasureReport".into());
    }
    if route.ends_with("/$generate-reports") {
        return Action::Write("MeasureReport".into());
    }
    // terminology operations read code systems, whatever the method carries the parameters
    if TERMINOLOGY_OPERATIONS.iter().any(|op| route.ends_with(op)) {
        let t = route
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        return Action::Read(t.to_string());
    }
    // `$validate` stores nothing: checking a body is open to every client; checking it against a
    // stored resource (instance level) reads that resource
    if route.ends_with("/$validate") {
        return match (route, rt) {
            ("/{type}/{id}/$validate", Some(t)) => Action::Read(t.to_string()),
            _ => Action::Open,
        };
    }
    let read = matches!(*method, Method::GET | Method::HEAD) || route.ends_with("/_search");
    let rt = match rt {
        Some(t) => t.to_string(),
        None => match route {
            "/" | "/metadata" => return Action::Open,
            "/_history" => return Action::ReadAll,
            // literal routes name their type (`/Subscription/{id}/$status`)
            other => other
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string(),
        },
    };
    if read {
        Action::Read(rt)
    } else {
        Action::Write(rt)
    }
}

/// May `caller` do this? The coarse rule of its role.
pub fn allows(caller: &Principal, action: &Action) -> bool {
    match action {
        Action::Open => true,
        // unscoped reads of everything: only a client limited nowhere
        // (the audit trail is not part of it: `history::system` leaves it out)
        Action::ReadAll => crate::fhir::SERVED_TYPES
            .iter()
            .filter(|t| **t != crate::auth::AUDIT_TYPE)
            .all(|t| caller.may_read(t) && caller.scope(t).is_none()),
        // an unknown type is the handler's 404
        Action::Read(rt) => !crate::fhir::is_served(rt) || caller.may_read(rt),
        Action::Write(rt) => !crate::fhir::is_served(rt) || caller.may_write(rt),
    }
}

/// The matched route below `/fhir` (the base itself, `/fhir` or `/fhir/`, is `/`).
pub fn route_below_base(matched: &str) -> String {
    match matched.trim_start_matches("/fhir") {
        "" => "/".to_string(),
        rest => rest.to_string(),
    }
}

/// Middleware on every routed FHIR request (a `route_layer`: it runs once the router has matched
/// and decoded the path).
pub async fn authorize(State(_): State<AppState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| route_below_base(m.as_str()))
        .unwrap_or_default();
    let rt = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(params) => params
            .iter()
            .find(|(k, _)| *k == "type")
            .map(|(_, v)| v.to_string()),
        Err(e) => return e.into_response(),
    };
    let action = action(&parts.method, &route, rt.as_deref());
    if action == Action::Open {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let Some(Caller(caller)) = parts.extensions.get::<Caller>().cloned() else {
        return ApiError::Unauthorized("authentication required".into()).into_response();
    };
    if !allows(&caller, &action) {
        return refuse(&caller, &action).into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

/// May `caller` scrape `GET /metrics`? Monitoring clients and administrators (and development
/// mode, where every request acts as one); the metrics name routes, rule sets and subscription
/// ids, not patients, but they are still nobody else's business.
pub fn may_scrape_metrics(caller: &Principal) -> bool {
    caller.development || matches!(caller.role, Role::Monitoring | Role::Admin)
}

/// Middleware on the `/metrics` route (a `route_layer`, after `authenticate`).
pub async fn authorize_metrics(req: Request, next: Next) -> Response {
    let Some(Caller(caller)) = req.extensions().get::<Caller>().cloned() else {
        return ApiError::Unauthorized("authentication required".into()).into_response();
    };
    if !may_scrape_metrics(&caller) {
        return ApiError::Forbidden(format!(
            "client '{}' ({:?}) may not read the server's metrics: the monitoring role may",
            caller.id, caller.role
        ))
        .into_response();
    }
    next.run(req).await
}

/// May `caller` open `/dashboard`? It shows case counts and subscription state: the clients that
/// read cases (regions, the ministry, administrators), never laboratories, EHRs or auditors.
pub fn may_view_dashboard(caller: &Principal) -> bool {
    use crate::auth::Role;
    caller.development
        || (matches!(caller.role, Role::Region | Role::Ministry | Role::Admin)
            && caller.may_read("Communication"))
}

/// May `caller` filter the dashboard by `region`? A region client only by its own regions (its
/// searches are limited to them anyway: this makes a foreign region a refusal, not an empty page).
pub fn dashboard_region_allowed(caller: &Principal, region: &str) -> bool {
    caller.development
        || caller.role != crate::auth::Role::Region
        || caller.regions.iter().any(|r| r == region)
}

fn refuse(caller: &Arc<Principal>, action: &Action) -> ApiError {
    if *action == Action::Write(crate::auth::AUDIT_TYPE.to_string()) {
        return ApiError::MethodNotAllowed(
            "the audit trail is written by the server only: AuditEvents cannot be created, changed or deleted"
                .into(),
        );
    }
    let what = match action {
        Action::Read(rt) => format!("read {rt}"),
        Action::Write(rt) => format!("write {rt}"),
        Action::ReadAll => "read the history of every type".to_string(),
        Action::Open => String::new(),
    };
    ApiError::Forbidden(format!(
        "client '{}' ({:?}) may not {what}",
        caller.id, caller.role
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_action_comes_from_the_route_not_the_raw_path() {
        assert_eq!(
            action(&Method::GET, "/{type}/{id}", Some("Communication")),
            Action::Read("Communication".into())
        );
        assert_eq!(
            action(&Method::POST, "/{type}/_search", Some("Patient")),
            Action::Read("Patient".into())
        );
        assert_eq!(
            action(&Method::GET, "/Subscription/{id}/$status", None),
            Action::Read("Subscription".into())
        );
        assert_eq!(action(&Method::POST, "/", None), Action::Open);
        assert_eq!(action(&Method::GET, "/_history", None), Action::ReadAll);
    }
}
