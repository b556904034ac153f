//! Terminology operations over HTTP: `CodeSystem/$lookup`, `CodeSystem/$subsumes`,
//! `ValueSet/$expand`, `ValueSet/$validate-code`, `ConceptMap/$translate` (type and instance level
//! where R4 has them). Inputs come as query parameters (GET, or POST without a body) or as a
//! `Parameters` body; a Coding may be written `system|code` in a query. Answers are R4
//! `Parameters` or a `ValueSet`; errors are OperationOutcomes naming the parameter. The work is in
//! `crate::terminology::operations`.
use axum::extract::{Path, RawQuery};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::format::{fhir_json, negotiate};
use super::parameters::{OperationBody, OperationParams, ParamValue};
use crate::error::{ApiError, ApiResult, Issue};
use crate::terminology::operations::{
    CodingIn, ExpandIn, LookupIn, Registry, SubsumesIn, Target, TermError, TranslateIn, ValidateIn,
    codings_of,
};

impl From<TermError> for ApiError {
    fn from(e: TermError) -> ApiError {
        let (status, code) = match &e {
            TermError::NotFound { .. } => (StatusCode::NOT_FOUND, "not-found"),
            TermError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid"),
            TermError::TooCostly(_) => (StatusCode::BAD_REQUEST, "too-costly"),
            TermError::NotSupported { .. } => (StatusCode::BAD_REQUEST, "not-supported"),
        };
        let expression = e.param().map(String::from);
        ApiError::Invalid {
            status,
            issues: vec![Issue::error(code, e.to_string(), expression)],
        }
    }
}

/// Parameters R4 defines for an operation that this server does not take, and why: a clear 400
/// rather than an answer that silently ignored them.
fn refuse(p: &OperationParams, unsupported: &[(&str, &str)]) -> ApiResult<()> {
    for (name, why) in unsupported {
        if p.all(name).next().is_some() {
            return Err(TermError::NotSupported {
                param: Some(name.to_string()),
                why: format!("{name} is not supported by this server: {why}"),
            }
            .into());
        }
    }
    Ok(())
}

fn text(p: &OperationParams, name: &str) -> ApiResult<Option<String>> {
    Ok(p.text(name)?.map(String::from))
}

/// A Coding: `valueCoding` in a body, `system|code` in a query.
fn coding(p: &OperationParams, name: &str) -> ApiResult<Option<CodingIn>> {
    match p.one(name)? {
        None => Ok(None),
        Some(ParamValue::Coding(v)) => Ok(Some(CodingIn::from_json(v))),
        Some(ParamValue::Text(t)) => Ok(Some(CodingIn::from_token(t))),
        Some(_) => Err(TermError::Invalid {
            param: name.to_string(),
            why: format!("{name} must be a Coding (valueCoding, or system|code in a query)"),
        }
        .into()),
    }
}

/// A CodeableConcept (`valueCodeableConcept`): its codings.
fn concept(p: &OperationParams, name: &str) -> ApiResult<Option<Vec<CodingIn>>> {
    Ok(p.concept(name)?.map(codings_of))
}

fn flag(p: &OperationParams, name: &str) -> ApiResult<bool> {
    Ok(p.flag(name)?.unwrap_or(false))
}

fn read(query: Option<&str>, body: &[u8], known: &[&str]) -> ApiResult<OperationParams> {
    let p = OperationParams::read(query, body)?;
    p.only(known)?;
    Ok(p)
}

fn answer(v: &serde_json::Value) -> Response {
    fhir_json(StatusCode::OK, v)
}

const LOOKUP: &[&str] = &[
    "code",
    "system",
    "version",
    "coding",
    "date",
    "displayLanguage",
    "property",
];

/// `GET|POST /CodeSystem/$lookup`.
pub async fn lookup(
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let p = read(query.as_deref(), &body, LOOKUP)?;
    refuse(
        &p,
        &[("date", "each code system has one version here, valid now")],
    )?;
    let mut properties = Vec::new();
    for v in p.all("property") {
        match v {
            ParamValue::Text(t) => properties.push(t.clone()),
            _ => {
                return Err(TermError::Invalid {
                    param: "property".into(),
                    why: "property must be a code".into(),
                }
                .into());
            }
        }
    }
    let input = LookupIn {
        system: text(&p, "system")?,
        code: text(&p, "code")?,
        version: text(&p, "version")?,
        coding: coding(&p, "coding")?,
        display_language: text(&p, "displayLanguage")?,
        properties,
    };
    Ok(answer(&Registry::get().lookup(&input)?))
}

const SUBSUMES: &[&str] = &["codeA", "codeB", "system", "version", "codingA", "codingB"];

async fn subsumes_with(
    instance: Option<String>,
    headers: HeaderMap,
    query: Option<String>,
    body: &[u8],
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let p = read(query.as_deref(), body, SUBSUMES)?;
    let input = SubsumesIn {
        instance,
        system: text(&p, "system")?,
        version: text(&p, "version")?,
        code_a: text(&p, "codeA")?,
        code_b: text(&p, "codeB")?,
        coding_a: coding(&p, "codingA")?,
        coding_b: coding(&p, "codingB")?,
    };
    Ok(answer(&Registry::get().subsumes(&input)?.to_parameters()))
}

/// `GET|POST /CodeSystem/$subsumes`.
pub async fn subsumes(
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    subsumes_with(None, headers, query, &body).await
}

/// `GET|POST /CodeSystem/{id}/$subsumes`.
pub async fn subsumes_instance(
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    subsumes_with(Some(id), headers, query, &body).await
}

const EXPAND: &[&str] = &[
    "url",
    "valueSet",
    "valueSetVersion",
    "context",
    "contextDirection",
    "filter",
    "date",
    "offset",
    "count",
    "includeDesignations",
    "designation",
    "includeDefinition",
    "activeOnly",
    "excludeNested",
    "excludeNotForUI",
    "excludePostCoordinated",
    "displayLanguage",
    "exclude-system",
    "system-version",
    "check-system-version",
    "force-system-version",
];

const EXPAND_UNSUPPORTED: &[(&str, &str)] = &[
    (
        "valueSet",
        "name a ValueSet the server has (url, or ValueSet/{id}/$expand)",
    ),
    ("context", "name the ValueSet by url"),
    ("contextDirection", "name the ValueSet by url"),
    ("date", "each ValueSet has one version here, valid now"),
    (
        "designation",
        "includeDesignations returns every designation there is",
    ),
    (
        "exclude-system",
        "each code system has one version here; nothing to choose",
    ),
    (
        "system-version",
        "each code system has one version here; nothing to choose",
    ),
    (
        "check-system-version",
        "each code system has one version here; nothing to choose",
    ),
    (
        "force-system-version",
        "each code system has one version here; nothing to choose",
    ),
];

async fn expand_with(
    id: Option<String>,
    headers: HeaderMap,
    query: Option<String>,
    body: &[u8],
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let p = read(query.as_deref(), body, EXPAND)?;
    refuse(&p, EXPAND_UNSUPPORTED)?;
    // the expansion is flat and has no post-coordinated codes whatever these say
    flag(&p, "excludeNested")?;
    flag(&p, "excludePostCoordinated")?;
    let input = ExpandIn {
        target: Target {
            id,
            url: text(&p, "url")?,
        },
        value_set_version: text(&p, "valueSetVersion")?,
        filter: text(&p, "filter")?,
        count: p.count("count")?,
        offset: p.count("offset")?,
        display_language: text(&p, "displayLanguage")?,
        include_designations: flag(&p, "includeDesignations")?,
        include_definition: flag(&p, "includeDefinition")?,
        active_only: flag(&p, "activeOnly")?,
        exclude_not_for_ui: flag(&p, "excludeNotForUI")?,
    };
    Ok(answer(&Registry::get().expand(&input)?))
}

/// `GET|POST /ValueSet/$expand`.
pub async fn expand(
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    expand_with(None, headers, query, &body).await
}

/// `GET|POST /ValueSet/{id}/$expand`.
pub async fn expand_instance(
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    expand_with(Some(id), headers, query, &body).await
}

const VALIDATE: &[&str] = &[
    "url",
    "context",
    "valueSet",
    "valueSetVersion",
    "code",
    "system",
    "systemVersion",
    "display",
    "coding",
    "codeableConcept",
    "date",
    "abstract",
    "displayLanguage",
];

const VALIDATE_UNSUPPORTED: &[(&str, &str)] = &[
    (
        "valueSet",
        "name a ValueSet the server has (url, or ValueSet/{id}/$validate-code)",
    ),
    ("context", "name the ValueSet by url"),
    ("date", "each ValueSet has one version here, valid now"),
];

async fn validate_with(
    id: Option<String>,
    headers: HeaderMap,
    query: Option<String>,
    body: &[u8],
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let p = read(query.as_deref(), body, VALIDATE)?;
    refuse(&p, VALIDATE_UNSUPPORTED)?;
    let input = ValidateIn {
        target: Target {
            id,
            url: text(&p, "url")?,
        },
        value_set_version: text(&p, "valueSetVersion")?,
        code: text(&p, "code")?,
        system: text(&p, "system")?,
        system_version: text(&p, "systemVersion")?,
        display: text(&p, "display")?,
        coding: coding(&p, "coding")?,
        codeable_concept: concept(&p, "codeableConcept")?,
        display_language: text(&p, "displayLanguage")?,
        abstract_ok: flag(&p, "abstract")?,
    };
    Ok(answer(
        &Registry::get().validate_code(&input)?.to_parameters(),
    ))
}

/// `GET|POST /ValueSet/$validate-code`.
pub async fn validate_code(
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    validate_with(None, headers, query, &body).await
}

/// `GET|POST /ValueSet/{id}/$validate-code`.
pub async fn validate_code_instance(
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    validate_with(Some(id), headers, query, &body).await
}

const TRANSLATE: &[&str] = &[
    "url",
    "conceptMap",
    "conceptMapVersion",
    "code",
    "system",
    "version",
    "source",
    "coding",
    "codeableConcept",
    "target",
    "targetsystem",
    "dependency",
    "reverse",
];

const TRANSLATE_UNSUPPORTED: &[(&str, &str)] = &[
    (
        "conceptMap",
        "name a ConceptMap the server has (url, or ConceptMap/{id}/$translate)",
    ),
    (
        "dependency",
        "none of the server's maps depends on other elements",
    ),
];

async fn translate_with(
    id: Option<String>,
    headers: HeaderMap,
    query: Option<String>,
    body: &[u8],
) -> ApiResult<Response> {
    negotiate(&headers, query.as_deref())?;
    let p = read(query.as_deref(), body, TRANSLATE)?;
    refuse(&p, TRANSLATE_UNSUPPORTED)?;
    let input = TranslateIn {
        map: Target {
            id,
            url: text(&p, "url")?,
        },
        concept_map_version: text(&p, "conceptMapVersion")?,
        code: text(&p, "code")?,
        system: text(&p, "system")?,
        version: text(&p, "version")?,
        coding: coding(&p, "coding")?,
        codeable_concept: concept(&p, "codeableConcept")?,
        source: text(&p, "source")?,
        target: text(&p, "target")?,
        target_system: text(&p, "targetsystem")?,
        reverse: flag(&p, "reverse")?,
    };
    Ok(answer(&Registry::get().translate(&input)?.to_parameters()))
}

/// `GET|POST /ConceptMap/$translate`.
pub async fn translate(
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    translate_with(None, headers, query, &body).await
}

/// `GET|POST /ConceptMap/{id}/$translate`.
pub async fn translate_instance(
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    OperationBody(body): OperationBody,
) -> ApiResult<Response> {
    translate_with(Some(id), headers, query, &body).await
}
