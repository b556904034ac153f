//! `/dashboard`: the epidemiologists' page. Server-rendered HTML with inline SVG charts (no script,
//! nothing fetched from elsewhere: it works offline), Italian labels. Every number is the total of
//! a FHIR search run as the viewer (`data`), linked to that search. Who may look is decided in
//! `policy::may_view_dashboard`; what they see is limited by their scope as in the API.
pub mod data;
pub mod filters;
pub mod render;
pub mod session;
pub mod svg;

use axum::Router;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::AppState;
use session::NoViewer;

/// A login form carries one token.
const LOGIN_BODY_LIMIT: usize = 16 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(show))
        .route("/dashboard/", get(show))
        .route(
            "/dashboard/login",
            get(login_form)
                .post(login)
                .layer(DefaultBodyLimit::max(LOGIN_BODY_LIMIT)),
        )
        .route("/dashboard/logout", post(logout))
}

/// An HTML answer with the headers every dashboard page has: nothing cached, nothing framed, no
/// script or outside resource allowed.
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

fn redirect(to: &'static str, cookie: Option<String>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

fn forbidden(viewer: &crate::auth::Principal) -> Response {
    html(
        StatusCode::FORBIDDEN,
        render::message(
            "Accesso negato",
            &format!(
                "Il client «{}» ({:?}) non può consultare il cruscotto: è riservato alle regioni, al ministero e agli amministratori.",
                viewer.id, viewer.role
            ),
            Some(("/dashboard/login", "Accedi con un altro token")),
        ),
    )
}

/// `GET /dashboard`
async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let (viewer, cookie_session) = match session::viewer(&state, &headers).await {
        Ok(v) => v,
        Err(NoViewer::Anonymous) => return redirect("/dashboard/login", None),
        Err(NoViewer::Rejected(why)) => {
            // a session whose token no longer holds ends here
            let mut r = html(StatusCode::UNAUTHORIZED, render::login(Some(&why)));
            if let Ok(c) = HeaderValue::from_str(&session::clear_cookie()) {
                r.headers_mut().insert(header::SET_COOKIE, c);
            }
            return r;
        }
    };
    if !super::policy::may_view_dashboard(&viewer) {
        return forbidden(&viewer);
    }
    if !viewer.development && state.rate_limits.check(&viewer.id).is_err() {
        return html(
            StatusCode::TOO_MANY_REQUESTS,
            render::message(
                "Troppe richieste",
                "Troppe richieste da questo client: riprovare tra qualche secondo.",
                None,
            ),
        );
    }
    let now = jiff::Timestamp::now();
    let tz = crate::surveillance::calendar::rome();
    let bad = |text: String, status: StatusCode| {
        html(
            status,
            render::message(
                "Filtri non validi",
                &text,
                Some(("/dashboard", "Torna al cruscotto")),
            ),
        )
    };
    let filters = match filters::parse(query.as_deref(), filters::Month::containing(now, &tz)) {
        Ok(f) => f,
        Err(why) => return bad(why, StatusCode::BAD_REQUEST),
    };
    if let Some(region) = &filters.region
        && !super::policy::dashboard_region_allowed(&viewer, region)
    {
        return bad(
            format!(
                "il client «{}» non vede i casi della regione {region}",
                viewer.id
            ),
            StatusCode::FORBIDDEN,
        );
    }
    let base = state
        .config
        .base_url
        .as_deref()
        .map(|b| b.trim_end_matches('/').to_string())
        .unwrap_or_else(|| "/fhir".to_string());
    let searcher = data::Searcher {
        state: &state,
        viewer: &viewer,
        base,
    };
    match searcher.dashboard(&filters, now).await {
        Ok(d) => html(
            StatusCode::OK,
            render::dashboard(&d, &filters, &viewer, cookie_session),
        ),
        Err(e) => {
            let reference = crate::error::correlation_id();
            tracing::error!(error = %e, %reference, "the dashboard could not be computed");
            html(
                e.status(),
                render::message(
                    "Errore",
                    &format!(
                        "Il cruscotto non può essere calcolato ora (riferimento {reference})."
                    ),
                    Some(("/dashboard", "Riprova")),
                ),
            )
        }
    }
}

/// `GET /dashboard/login`
async fn login_form(State(state): State<AppState>) -> Response {
    if state.access.is_development() {
        return redirect("/dashboard", None);
    }
    html(StatusCode::OK, render::login(None))
}

/// `POST /dashboard/login` (form field `token`)
async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !session::same_origin(&headers) {
        return html(
            StatusCode::FORBIDDEN,
            render::message("Accesso negato", "Richiesta da un'altra origine.", None),
        );
    }
    if state.access.is_development() {
        return redirect("/dashboard", None);
    }
    let token = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    match session::check(&state, &headers, &token).await {
        Ok(viewer) if super::policy::may_view_dashboard(&viewer) => redirect(
            "/dashboard",
            Some(session::set_cookie(&state, &headers, &token)),
        ),
        Ok(viewer) => forbidden(&viewer),
        Err(NoViewer::Anonymous) => html(
            StatusCode::BAD_REQUEST,
            render::login(Some("Incollare un token di accesso.")),
        ),
        Err(NoViewer::Rejected(why)) => html(StatusCode::UNAUTHORIZED, render::login(Some(&why))),
    }
}

/// `POST /dashboard/logout`
async fn logout(headers: HeaderMap) -> Response {
    if !session::same_origin(&headers) {
        return html(
            StatusCode::FORBIDDEN,
            render::message("Accesso negato", "Richiesta da un'altra origine.", None),
        );
    }
    redirect("/dashboard/login", Some(session::clear_cookie()))
}
