//! FHIR XML at the edge: XML bodies become JSON before anything else sees them, and responses become
//! XML after the handlers ran, when the client asked for it. fhirbolt reads and writes R4 XML (in
//! the `sentinella-fhir-xml` crate, for build time); the server itself speaks JSON.
use axum::body::{Body, to_bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::format::{Format, wanted_format};
use crate::error::ApiError;

pub const FHIR_XML: &str = "application/fhir+xml; charset=utf-8";

pub use sentinella_fhir_xml::{json_to_xml, xml_to_json};

/// Middleware: a JSON response becomes XML when `_format` or `Accept` asks for XML.
pub async fn respond_in_xml_when_asked(req: Request, next: Next) -> Response {
    let format = wanted_format(req.headers(), req.uri().query());
    let resp = next.run(req).await;
    if !matches!(format, Ok(Format::Xml)) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/fhir+json"));
    if !is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = match to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::BadRequest(format!("response body unreadable: {e}")).into_response();
        }
    };
    match json_to_xml(&bytes) {
        Ok(xml) => {
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_XML));
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(xml))
        }
        Err(e) => {
            tracing::error!(error = %e, "could not write the response as XML");
            let mut r = ApiError::NotAcceptable(format!(
                "this response cannot be written as XML ({e}); ask for JSON"
            ))
            .into_response();
            *r.status_mut() = StatusCode::NOT_ACCEPTABLE;
            r
        }
    }
}
