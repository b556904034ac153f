//! The wire edge: content types, `_format`, `Prefer`, reading bodies within the size limit, and
//! writing FHIR JSON responses.
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::AppState;
use crate::error::ApiError;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// A FHIR JSON response with the given status.
pub fn fhir_json(status: StatusCode, body: &Value) -> Response {
    let text = serde_json::to_string(body).unwrap_or_default();
    raw_json(status, text)
}

pub fn raw_json(status: StatusCode, text: String) -> Response {
    let mut resp = (status, Body::from(text)).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp
}

/// The media type without parameters; an unencoded `+` in `_format` arrives as a space.
fn mime(m: &str) -> String {
    m.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
        .replace(' ', "+")
}

fn is_json_mime(m: &str) -> bool {
    let m = mime(m);
    matches!(
        m.as_str(),
        "application/fhir+json" | "application/json" | "application/json+fhir" | "json"
    )
}

fn is_xml_mime(m: &str) -> bool {
    let m = mime(m);
    matches!(
        m.as_str(),
        "application/fhir+xml" | "application/xml" | "text/xml" | "xml" | "application/xml+fhir"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

/// What the client wants back: `_format` wins over `Accept`; JSON unless XML is preferred.
pub fn wanted_format(headers: &HeaderMap, query: Option<&str>) -> Result<Format, ApiError> {
    let format = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "_format")
            .map(|(_, v)| v.into_owned())
    });
    if let Some(f) = format {
        return if is_json_mime(&f) {
            Ok(Format::Json)
        } else if is_xml_mime(&f) {
            Ok(Format::Xml)
        } else {
            Err(ApiError::NotAcceptable(format!(
                "_format={f} is not supported: use json or xml"
            )))
        };
    }
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Format::Json);
    };
    for m in accept.split(',') {
        let m = m.split(';').next().unwrap_or("").trim();
        if is_json_mime(m) || m == "*/*" || m == "application/*" || m.is_empty() {
            return Ok(Format::Json);
        }
        if is_xml_mime(m) {
            return Ok(Format::Xml);
        }
    }
    Err(ApiError::NotAcceptable(format!(
        "Accept: {accept} cannot be satisfied: this server writes application/fhir+json and application/fhir+xml"
    )))
}

/// Check that the response can be written in a format the client accepts.
pub fn negotiate(headers: &HeaderMap, query: Option<&str>) -> Result<(), ApiError> {
    wanted_format(headers, query).map(|_| ())
}

/// What the `Prefer` header asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReturnPref {
    #[default]
    Representation,
    Minimal,
    OperationOutcome,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Prefer {
    pub ret: ReturnPref,
    pub lenient: bool,
}

impl Prefer {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut p = Prefer::default();
        for v in headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            for part in v.split([',', ';']).map(str::trim) {
                match part.replace(' ', "").as_str() {
                    "return=minimal" => p.ret = ReturnPref::Minimal,
                    "return=representation" => p.ret = ReturnPref::Representation,
                    "return=OperationOutcome" => p.ret = ReturnPref::OperationOutcome,
                    "handling=lenient" => p.lenient = true,
                    "handling=strict" => p.lenient = false,
                    _ => {}
                }
            }
        }
        p
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Prefer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Prefer::from_headers(&parts.headers))
    }
}

/// The server's base URL as the client sees it (`http://host/fhir`), for fullUrl and Location.
#[derive(Debug, Clone)]
pub struct BaseUrl(pub String);

impl FromRequestParts<AppState> for BaseUrl {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(b) = &state.config.base_url {
            return Ok(BaseUrl(b.trim_end_matches('/').to_string()));
        }
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        Ok(BaseUrl(format!("http://{host}/fhir")))
    }
}

/// A request body that is FHIR JSON, read within the configured size limit.
pub struct FhirBody(pub Bytes);

impl FromRequest<AppState> for FhirBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.config.max_body_bytes;
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let xml = is_xml_mime(&ct);
        if !is_json_mime(&ct) && !xml {
            let why = if ct.is_empty() {
                "Content-Type is missing: send application/fhir+json or application/fhir+xml"
                    .to_string()
            } else {
                format!(
                    "Content-Type {ct} is not supported: send application/fhir+json or application/fhir+xml"
                )
            };
            return Err(ApiError::UnsupportedMediaType(why));
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| body_error(&e, limit))?;
        if xml {
            let json = super::xml::xml_to_json(&bytes).map_err(|e| {
                ApiError::invalid(vec![crate::error::Issue::error(
                    "structure",
                    format!("the body is not a valid FHIR R4 XML resource: {e}"),
                    None,
                )])
            })?;
            return Ok(FhirBody(Bytes::from(json)));
        }
        Ok(FhirBody(bytes))
    }
}

/// Why a body could not be read: over the size limit (413), or it stopped arriving — the client
/// went away or sent too slowly (408), which is not the client's size problem.
fn body_error(e: &axum::Error, limit: usize) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return ApiError::PayloadTooLarge(limit);
        }
        source = s.source();
    }
    ApiError::ClientGone
}
