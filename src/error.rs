//! Every error the server can answer with, and the one place where it becomes an OperationOutcome.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One OperationOutcome issue: what went wrong and where (a FHIRPath expression).
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub severity: Severity,
    /// A code from http://hl7.org/fhir/issue-type (structure, required, value, invariant, code-invalid, …).
    pub code: &'static str,
    pub diagnostics: String,
    pub expression: Option<String>,
    /// A coded outcome (system, code) and its text, as `issue.details` (the rules' receipts).
    pub details: Option<(String, String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

impl Issue {
    pub fn error(
        code: &'static str,
        diagnostics: impl Into<String>,
        expression: Option<String>,
    ) -> Self {
        Issue {
            severity: Severity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression,
            details: None,
        }
    }

    /// What a pre-commit rule noted about a written resource (a receipt for its sender).
    pub fn from_note(n: &crate::store::Note) -> Self {
        Issue {
            severity: if n.severity == "warning" {
                Severity::Warning
            } else {
                Severity::Information
            },
            code: "informational",
            diagnostics: n.text.clone(),
            expression: Some(n.resource_type.clone()),
            details: Some((n.system.clone(), n.code.clone(), n.text.clone())),
        }
    }

    /// The same issue, seen from inside a Bundle entry (`Bundle.entry[i].resource.…`).
    pub fn within_entry(mut self, index: usize) -> Self {
        let prefix = format!("Bundle.entry[{index}].resource");
        self.expression = Some(match self.expression.take() {
            // expressions start with the resource type ("Observation.status"): swap it for the entry path
            Some(e) => match e.split_once('.') {
                Some((_, rest)) => format!("{prefix}.{rest}"),
                None => prefix,
            },
            None => prefix,
        });
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("the resource is not valid")]
    Invalid {
        status: StatusCode,
        issues: Vec<Issue>,
    },
    /// No or an unknown bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but the client's role does not allow this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("storage failure: {0}")]
    Storage(#[from] crate::store::StoreError),
    /// Overloaded: the client should retry after a short while (503 with `Retry-After`).
    #[error("{0}")]
    Unavailable(String),
    /// The client went away before its write started: nobody receives this answer.
    #[error("the client went away")]
    ClientGone,
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(issues: Vec<Issue>) -> Self {
        ApiError::Invalid {
            status: StatusCode::BAD_REQUEST,
            issues,
        }
    }

    pub fn unprocessable(issues: Vec<Issue>) -> Self {
        ApiError::Invalid {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            issues,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid { status, .. } => *status,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Storage(e) if e.is_conflict() => StatusCode::CONFLICT,
            ApiError::Storage(e) if e.is_overload() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            // 499 in nginx's sense; never sent, the client is gone
            ApiError::ClientGone => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn issues(&self) -> Vec<Issue> {
        let code = match self {
            ApiError::Invalid { issues, .. } => return issues.clone(),
            ApiError::BadRequest(_) => "invalid",
            ApiError::Unauthorized(_) => "login",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) | ApiError::Gone(_) => "not-found",
            ApiError::Conflict(_) | ApiError::PreconditionFailed(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "too-costly",
            ApiError::UnsupportedMediaType(_)
            | ApiError::NotAcceptable(_)
            | ApiError::MethodNotAllowed(_) => "not-supported",
            ApiError::Storage(e) if e.is_conflict() => "conflict",
            ApiError::Storage(e) if e.is_overload() => "transient",
            ApiError::Storage(_) | ApiError::Internal(_) => "exception",
            ApiError::Unavailable(_) | ApiError::ClientGone => "transient",
        };
        vec![Issue::error(code, self.to_string(), None)]
    }

    /// The same error, seen from inside a Bundle entry.
    pub fn within_entry(self, index: usize) -> Self {
        match self {
            ApiError::Invalid { status, issues } => ApiError::Invalid {
                status,
                issues: issues.into_iter().map(|i| i.within_entry(index)).collect(),
            },
            other => other,
        }
    }

    /// The OperationOutcome a client gets. An internal error's detail (a database's message, a
    /// file path) goes to the log only; the client gets a reference to find it there.
    pub fn outcome(&self) -> Value {
        if self.status() == StatusCode::INTERNAL_SERVER_ERROR {
            let reference = correlation_id();
            tracing::error!(error = %self, %reference, "request failed");
            return internal_outcome(&reference);
        }
        operation_outcome(&self.issues())
    }
}

pub fn operation_outcome(issues: &[Issue]) -> Value {
    let issues: Vec<Value> = issues
        .iter()
        .map(|i| {
            let mut v = json!({"severity": i.severity.as_str(), "code": i.code, "diagnostics": i.diagnostics});
            if let Some(e) = &i.expression {
                v["expression"] = json!([e]);
            }
            if let Some((system, code, text)) = &i.details {
                v["details"] = json!({"coding": [{"system": system, "code": code}], "text": text});
            }
            v
        })
        .collect();
    json!({"resourceType": "OperationOutcome", "issue": issues})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let challenge = matches!(self, ApiError::Unauthorized(_));
        let retry = status == StatusCode::SERVICE_UNAVAILABLE;
        if status.is_client_error() {
            tracing::info!(status = status.as_u16(), error = %self, "request rejected");
        } else if status != StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(status = status.as_u16(), error = %self, "request not served");
        }
        let outcome = self.outcome();
        let mut response = crate::api::format::fhir_json(status, &outcome).into_response();
        if challenge {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"sentinella\""),
            );
        }
        if retry {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A fresh reference that ties a client's 500 to the log line with its detail.
pub fn correlation_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// What a client is told of an internal error: that it happened, and the reference to quote.
pub fn internal_outcome(reference: &str) -> Value {
    operation_outcome(&[Issue::error(
        "exception",
        format!("internal error; the server's log has the detail under reference {reference}"),
        None,
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_error_reaches_the_client_as_a_reference_only() {
        let err = ApiError::Storage(crate::store::StoreError::GroupCommit(
            "disk I/O error at /var/lib/sentinella/sentinella.db-wal".into(),
        ));
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let text = err.outcome().to_string();
        assert!(!text.contains("/var/lib"), "{text}");
        assert!(!text.contains("disk I/O"), "{text}");
        assert!(text.contains("reference"), "{text}");
        // two failures, two references
        assert_ne!(err.outcome(), err.outcome());
        // a client error keeps its precise message
        let bad = ApiError::BadRequest("_count 'x' is not a number".into());
        assert!(bad.outcome().to_string().contains("_count 'x'"));
    }
}
