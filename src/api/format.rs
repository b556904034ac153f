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

pub fn raw_json(status: StatusCode, text: impl Into<Body>) -> Response {
    let mut resp = (status, text.into()).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp
}

/// The media type without parameters, lower case; an unencoded `+` in `_format` arrives as a space.
pub fn mime(m: &str) -> String {
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

impl Format {
    /// The `_format` value that names this format in links the server writes (`self`, `next`).
    pub fn param(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Xml => "xml",
        }
    }
}

/// The format a `_format` value names: `json`, `xml` and the JSON and XML media types R4 lists
/// (`application/fhir+json`, `application/json`, `application/fhir+xml`, `application/xml`,
/// `text/xml`, and the DSTU2 `application/json+fhir` / `application/xml+fhir`), in any case, with
/// or without parameters.
pub fn format_param(value: &str) -> Result<Format, ApiError> {
    if is_json_mime(value) {
        Ok(Format::Json)
    } else if is_xml_mime(value) {
        Ok(Format::Xml)
    } else {
        Err(ApiError::NotAcceptable(format!(
            "_format={value} is not supported: use json or xml (or application/fhir+json, application/fhir+xml)"
        )))
    }
}

/// The `_format` of a query, if it has one (the first one: every reader of `_format` uses this).
pub fn format_in_query(query: Option<&str>) -> Option<String> {
    query.and_then(|q| {
        form_urlencoded::parse(q.trim_start_matches('?').as_bytes())
            .find(|(k, _)| k == "_format")
            .map(|(_, v)| v.into_owned())
    })
}

/// What the client wants back: `_format` wins over `Accept`; JSON unless XML is preferred.
/// `Accept` is read with its quality values (`q=0` refuses a type); among equals the first listed wins.
pub fn wanted_format(headers: &HeaderMap, query: Option<&str>) -> Result<Format, ApiError> {
    if let Some(f) = format_in_query(query) {
        return format_param(&f);
    }
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Format::Json);
    };
    let mut best: Option<(f32, Format)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let m = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|v| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let format = if is_json_mime(m) || m == "*/*" || m == "application/*" || m.is_empty() {
            Format::Json
        } else if is_xml_mime(m) {
            Format::Xml
        } else {
            continue;
        };
        if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
            best = Some((q, format));
        }
    }
    best.map(|(_, f)| f).ok_or_else(|| {
        ApiError::NotAcceptable(format!(
            "Accept: {accept} cannot be satisfied: this server writes application/fhir+json and application/fhir+xml"
        ))
    })
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
        let bytes = read_body(req, limit).await?;
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

/// A request body, at most `limit` bytes: 413 beyond it (at once when `Content-Length` says so).
pub async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| body_error(&e, limit))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn every_r4_format_alias_is_understood() {
        for v in [
            "json",
            "JSON",
            "application/json",
            "application/fhir+json",
            "application/fhir json",
            "application/json+fhir",
            "application/fhir+json; fhirVersion=4.0",
        ] {
            assert_eq!(format_param(v).unwrap(), Format::Json, "{v}");
        }
        for v in [
            "xml",
            "text/xml",
            "application/xml",
            "application/fhir+xml",
            "application/xml+fhir",
        ] {
            assert_eq!(format_param(v).unwrap(), Format::Xml, "{v}");
        }
        for v in ["ttl", "text/turtle", "html", ""] {
            assert!(format_param(v).is_err(), "{v}");
        }
        // `_format` wins over Accept
        let q = Some("_count=2&_format=application%2Ffhir%2Bxml");
        assert_eq!(
            wanted_format(&accept("application/fhir+json"), q).unwrap(),
            Format::Xml
        );
    }

    #[test]
    fn accept_is_read_with_its_quality_values() {
        let f = |v: &str| wanted_format(&accept(v), None);
        assert_eq!(f("application/fhir+xml").unwrap(), Format::Xml);
        assert_eq!(
            f("application/fhir+xml;q=0.5, application/fhir+json").unwrap(),
            Format::Json
        );
        assert_eq!(
            f("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8").unwrap(),
            Format::Xml
        );
        assert_eq!(f("application/fhir+xml, */*").unwrap(), Format::Xml);
        assert!(f("application/fhir+json;q=0, text/html").is_err());
        assert!(f("text/turtle").is_err());
    }
}
