//! `$status` and `$events` on Subscriptions (Backport IG 1.1.0): a subscriber sees its state and
//! replays its events by number, whatever was or was not delivered.
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::format::{BaseUrl, fhir_json, negotiate};
use super::search::SearchRequest;
use super::{AppState, Caller};
use crate::error::{ApiError, ApiResult, Issue};
use crate::store::SubscriptionRow;
use crate::subscriptions::bundle::{StatusInfo, notification, status_parameters};
use crate::subscriptions::spec::{Content, Spec};
use crate::subscriptions::worker::event_content;

/// Most events one `$events` call returns; ask again from the last number for more.
const MAX_EVENTS: i64 = 1000;

/// The caller's Subscription with its delivery state (404 for someone else's).
async fn visible_subscription(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<(Value, SubscriptionRow)> {
    let not_found = || ApiError::NotFound(format!("Subscription/{id} is not known"));
    let stored = state
        .store
        .read("Subscription", id)
        .await?
        .filter(|s| !s.deleted)
        .ok_or_else(not_found)?;
    caller.check_sees(&stored)?;
    let resource =
        crate::subscriptions::parse_body(stored.body.as_deref()).ok_or_else(not_found)?;
    let mut row = state.store.subscription(id).await?.ok_or_else(not_found)?;
    if row.unnumbered {
        // events wait in the outbox for the delivery lease holder, which may not come (a
        // subscription in error): number them now, so the counts and $events are complete
        let store = state.store.clone();
        let sub = id.to_string();
        state
            .writes
            .run(|_| async move {
                let mut tx = store.begin().await?;
                tx.sub_number_events(&sub).await?;
                Ok(tx.commit().await?)
            })
            .await?;
        row = state.store.subscription(id).await?.ok_or_else(not_found)?;
    }
    Ok((resource, row))
}

fn status_of(row: &SubscriptionRow) -> StatusInfo<'_> {
    StatusInfo {
        subscription_id: &row.id,
        topic: &row.topic,
        status: status_code(&row.status),
        events_since_start: row.events_count,
        error: row.last_error.as_deref(),
    }
}

fn status_code(s: &str) -> &'static str {
    match s {
        "requested" => "requested",
        "active" => "active",
        "error" => "error",
        _ => "off",
    }
}

fn searchset(entries: Vec<Value>) -> Value {
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
    });
    // FHIR JSON has no empty arrays: no subscription, no `entry`
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    bundle
}

fn status_entry(base: &str, row: &SubscriptionRow) -> Value {
    let p = status_parameters(base, &status_of(row), "query-status", Content::Empty, &[]);
    json!({"fullUrl": format!("urn:uuid:{}", p["id"].as_str().unwrap_or_default()),
        "resource": p, "search": {"mode": "match"}})
}

/// `GET /Subscription/<id>/$status`
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let (_, row) = visible_subscription(&state, &caller, &id).await?;
    Ok(fhir_json(
        StatusCode::OK,
        &searchset(vec![status_entry(&base.0, &row)]),
    ))
}

/// `GET /Subscription/$status?id=a,b&status=active`: the caller's subscriptions.
pub async fn status_type(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let mut ids: Vec<String> = Vec::new();
    let mut statuses: Vec<String> = Vec::new();
    for (k, v) in SearchRequest::from_query(query.as_deref().unwrap_or("")).pairs {
        match k.as_str() {
            "id" => ids.extend(v.split(',').map(String::from)),
            "status" => statuses.extend(v.split(',').map(String::from)),
            "_format" | "_pretty" => {}
            other => {
                return Err(ApiError::invalid(vec![Issue::error(
                    "not-supported",
                    format!("$status takes id and status, not '{other}'"),
                    Some(other.to_string()),
                )]));
            }
        }
    }
    if ids.is_empty() {
        // every subscription of the caller, through the scoped search
        let mut q = crate::store::SearchQuery {
            resource_type: "Subscription".into(),
            count: 1000,
            ..Default::default()
        };
        if let Some(scope) = caller.0.scope("Subscription") {
            q.conditions.extend(scope);
        }
        ids = state
            .store
            .search(&q)
            .await?
            .matches
            .into_iter()
            .map(|m| m.id)
            .collect();
    }
    let mut entries = Vec::new();
    for id in ids {
        let Ok((_, row)) = visible_subscription(&state, &caller, &id).await else {
            continue;
        };
        if statuses.is_empty() || statuses.iter().any(|s| s == status_code(&row.status)) {
            entries.push(status_entry(&base.0, &row));
        }
    }
    Ok(fhir_json(StatusCode::OK, &searchset(entries)))
}

/// `GET /Subscription/<id>/$events?eventsSinceNumber=&eventsUntilNumber=&content=`
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    base: BaseUrl,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let (resource, row) = visible_subscription(&state, &caller, &id).await?;
    let spec = Spec::parse(&resource).map_err(ApiError::unprocessable)?;
    let mut since = 1i64;
    let mut until = row.events_count;
    let mut content = spec.content;
    for (k, v) in SearchRequest::from_query(query.as_deref().unwrap_or("")).pairs {
        let number = |v: &str| {
            v.parse::<i64>().map_err(|_| {
                ApiError::invalid(vec![Issue::error(
                    "value",
                    format!("{k} '{v}' is not an event number"),
                    Some(k.clone()),
                )])
            })
        };
        match k.as_str() {
            "eventsSinceNumber" => since = number(&v)?.max(1),
            "eventsUntilNumber" => until = number(&v)?.min(row.events_count),
            "content" => {
                content = match v.as_str() {
                    "empty" => Content::Empty,
                    "id-only" => Content::IdOnly,
                    "full-resource" => Content::FullResource,
                    other => {
                        return Err(ApiError::invalid(vec![Issue::error(
                            "code-invalid",
                            format!("content '{other}' is not empty, id-only or full-resource"),
                            Some("content".into()),
                        )]));
                    }
                }
            }
            "_format" | "_pretty" => {}
            other => {
                return Err(ApiError::invalid(vec![Issue::error(
                    "not-supported",
                    format!(
                        "$events takes eventsSinceNumber, eventsUntilNumber and content, not '{other}'"
                    ),
                    Some(other.to_string()),
                )]));
            }
        }
    }
    // delivered events older than the retention are gone: say so rather than answer silently short
    let pruned = (since <= row.pruned_count).then(|| {
        format!(
            "events 1 to {} were delivered and pruned after the retention period; the earliest available is {}",
            row.pruned_count,
            row.pruned_count + 1
        )
    });
    let since = since.max(row.pruned_count + 1);
    let rows = if since <= until {
        state
            .store
            .subscription_events(&id, since, until, MAX_EVENTS)
            .await?
    } else {
        vec![]
    };
    let mut events = Vec::with_capacity(rows.len());
    for e in rows {
        events.push(event_content(state.store.as_ref(), &spec, content, e).await?);
    }
    let mut status = status_of(&row);
    if let Some(note) = &pruned {
        status.error = Some(note);
    }
    let bundle = notification(&base.0, &status, "query-event", content, &events);
    Ok(fhir_json(StatusCode::OK, &bundle))
}
