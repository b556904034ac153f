//! An operation's input, read the two ways FHIR allows: query parameters (GET, or POST with an
//! empty body) and a `Parameters` resource in the body. Every operation reads its inputs here, so
//! they all refuse the same malformed bodies with the same OperationOutcome.
use bytes::Bytes;
use serde_json::Value;

use super::AppState;
use super::format::FhirBody;
use crate::error::{ApiError, ApiResult, Issue};

/// An operation's body: a Parameters resource (or, for `$validate`, a resource), or nothing.
pub struct OperationBody(pub Bytes);

impl axum::extract::FromRequest<AppState> for OperationBody {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self, ApiError> {
        use axum::http::header;
        let h = req.headers();
        let empty = !h.contains_key(header::CONTENT_TYPE)
            && h.get(header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0");
        if empty && !h.contains_key(header::TRANSFER_ENCODING) {
            return Ok(OperationBody(Bytes::new()));
        }
        let FhirBody(b) = FhirBody::from_request(req, state).await?;
        Ok(OperationBody(b))
    }
}

/// The largest Parameters body an operation that takes only values reads (a `$validate` body,
/// which carries a resource, is bounded by the server's body limit instead).
pub const MAX_PARAMETERS_BYTES: usize = 64 * 1024;

/// One parameter's value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// A primitive (`valueString`, `valueCode`, `valueUri`, `valueInteger`…) or a query value.
    Text(String),
    /// `valueCoding`.
    Coding(Value),
    /// `valueCodeableConcept`.
    Concept(Value),
    /// `resource`.
    Resource(Value),
    /// `part`: the parameter's own parameters.
    Parts(Vec<(String, ParamValue)>),
}

/// An operation's parameters, in the order given.
#[derive(Debug, Clone, Default)]
pub struct OperationParams {
    pub items: Vec<(String, ParamValue)>,
}

fn invalid(why: impl Into<String>, at: Option<String>) -> ApiError {
    ApiError::invalid(vec![Issue::error("invalid", why, at)])
}

impl OperationParams {
    /// The query's parameters (those starting with `_`, such as `_format`, are the server's), then
    /// a `Parameters` body's, within [`MAX_PARAMETERS_BYTES`].
    pub fn read(query: Option<&str>, body: &[u8]) -> ApiResult<Self> {
        if body.len() > MAX_PARAMETERS_BYTES {
            return Err(ApiError::PayloadTooLarge(MAX_PARAMETERS_BYTES));
        }
        let mut out = Self::from_query(query);
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(out);
        }
        let v = crate::fhir::resource::parse_json(body)?;
        out.items.extend(Self::from_resource(&v)?.items);
        Ok(out)
    }

    /// The query's parameters only.
    pub fn from_query(query: Option<&str>) -> Self {
        let items = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .filter(|(k, _)| !k.starts_with('_'))
            .map(|(k, v)| (k.into_owned(), ParamValue::Text(v.into_owned())))
            .collect();
        OperationParams { items }
    }

    /// A parsed `Parameters` resource; anything else is a 400 naming `resourceType`.
    pub fn from_resource(v: &Value) -> ApiResult<Self> {
        if v["resourceType"] != "Parameters" {
            return Err(ApiError::invalid(vec![Issue::error(
                "structure",
                "an operation's body must be a Parameters resource",
                Some("resourceType".into()),
            )]));
        }
        let items = read_list(&v["parameter"], "Parameters.parameter", 0)?;
        Ok(OperationParams { items })
    }

    /// Every value given for `name`.
    pub fn all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a ParamValue> + use<'a> {
        let name = name.to_string();
        self.items
            .iter()
            .filter(move |(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The one value of `name`, if given; twice is a 400.
    pub fn one(&self, name: &str) -> ApiResult<Option<&ParamValue>> {
        let mut found = self.all(name);
        let first = found.next();
        if found.next().is_some() {
            return Err(invalid(
                format!("{name} is given more than once"),
                Some(name.to_string()),
            ));
        }
        Ok(first)
    }

    /// The one primitive value of `name`; a Coding, a resource or parts there is a 400.
    pub fn text(&self, name: &str) -> ApiResult<Option<&str>> {
        match self.one(name)? {
            None => Ok(None),
            Some(ParamValue::Text(t)) => Ok(Some(t)),
            Some(_) => Err(invalid(
                format!("{name} must be a primitive value"),
                Some(name.to_string()),
            )),
        }
    }

    /// Like [`Self::text`], and missing is a 400.
    pub fn required_text(&self, name: &str) -> ApiResult<&str> {
        self.text(name)?
            .ok_or_else(|| invalid(format!("{name} is required"), Some(name.to_string())))
    }

    /// The one Coding given as `name`; a primitive there is a 400.
    pub fn coding(&self, name: &str) -> ApiResult<Option<&Value>> {
        match self.one(name)? {
            None => Ok(None),
            Some(ParamValue::Coding(c)) => Ok(Some(c)),
            Some(_) => Err(invalid(
                format!("{name} must be a Coding"),
                Some(name.to_string()),
            )),
        }
    }

    /// The one CodeableConcept given as `name`.
    pub fn concept(&self, name: &str) -> ApiResult<Option<&Value>> {
        match self.one(name)? {
            None => Ok(None),
            Some(ParamValue::Concept(c)) => Ok(Some(c)),
            Some(_) => Err(invalid(
                format!("{name} must be a CodeableConcept"),
                Some(name.to_string()),
            )),
        }
    }

    /// The one resource given as `name`.
    pub fn resource(&self, name: &str) -> ApiResult<Option<&Value>> {
        match self.one(name)? {
            None => Ok(None),
            Some(ParamValue::Resource(r)) => Ok(Some(r)),
            Some(_) => Err(invalid(
                format!("{name} must be a resource"),
                Some(name.to_string()),
            )),
        }
    }

    /// The one non-negative integer given as `name`.
    pub fn count(&self, name: &str) -> ApiResult<Option<usize>> {
        self.text(name)?
            .map(|t| {
                t.parse::<usize>().map_err(|_| {
                    invalid(
                        format!("{name} must be a non-negative integer, not '{t}'"),
                        Some(name.to_string()),
                    )
                })
            })
            .transpose()
    }

    /// A boolean given as `name` (`true`/`false`).
    pub fn flag(&self, name: &str) -> ApiResult<Option<bool>> {
        match self.text(name)? {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(invalid(
                format!("{name} must be true or false, not '{other}'"),
                Some(name.to_string()),
            )),
        }
    }

    /// Refuse parameters the operation does not define (a misspelt `fliter` is not silently ignored).
    pub fn only(&self, known: &[&str]) -> ApiResult<()> {
        match self
            .items
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            None => Ok(()),
            Some((k, _)) => Err(invalid(
                format!(
                    "'{k}' is not a parameter of this operation (it takes {})",
                    known.join(", ")
                ),
                Some(k.clone()),
            )),
        }
    }
}

/// Nested parts go at most this deep (no operation of ours needs more than one level).
const MAX_PART_DEPTH: usize = 4;

fn read_list(list: &Value, at: &str, depth: usize) -> ApiResult<Vec<(String, ParamValue)>> {
    let Some(items) = list.as_array() else {
        return Ok(Vec::new());
    };
    if depth > MAX_PART_DEPTH {
        return Err(invalid("parameters are nested too deeply", Some(at.into())));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, p) in items.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let Some(name) = p["name"].as_str() else {
            return Err(invalid(
                "a parameter has no name",
                Some(format!("{here}.name")),
            ));
        };
        let obj = p.as_object().into_iter().flatten();
        let mut value = None;
        for (k, v) in obj {
            let read = match k.as_str() {
                "valueCoding" => Some(ParamValue::Coding(v.clone())),
                "valueCodeableConcept" => Some(ParamValue::Concept(v.clone())),
                "resource" => Some(ParamValue::Resource(v.clone())),
                "part" => Some(ParamValue::Parts(read_list(
                    v,
                    &format!("{here}.part"),
                    depth + 1,
                )?)),
                k if k.starts_with("value") => match v {
                    Value::String(s) => Some(ParamValue::Text(s.clone())),
                    Value::Number(n) => Some(ParamValue::Text(n.to_string())),
                    Value::Bool(b) => Some(ParamValue::Text(b.to_string())),
                    _ => {
                        return Err(invalid(
                            format!("parameter {name}: {k} is not a value this server reads"),
                            Some(format!("{here}.{k}")),
                        ));
                    }
                },
                _ => None,
            };
            if let Some(read) = read {
                if value.is_some() {
                    return Err(invalid(
                        format!("parameter {name} has more than one value"),
                        Some(here),
                    ));
                }
                value = Some(read);
            }
        }
        match value {
            Some(v) => out.push((name.to_string(), v)),
            None => {
                return Err(invalid(
                    format!("parameter {name} has no value"),
                    Some(here),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_and_body_parameters_are_read_with_their_types() {
        let body = json!({"resourceType": "Parameters", "parameter": [
            {"name": "url", "valueUri": "http://x/vs"},
            {"name": "count", "valueInteger": 10},
            {"name": "coding", "valueCoding": {"system": "http://loinc.org", "code": "600-7"}},
            {"name": "dependency", "part": [{"name": "element", "valueUri": "a"}]}
        ]});
        let p = OperationParams::read(
            Some("filter=kleb&_format=json"),
            body.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(p.text("filter").unwrap(), Some("kleb"));
        assert_eq!(p.text("_format").unwrap(), None);
        assert_eq!(p.count("count").unwrap(), Some(10));
        assert_eq!(p.coding("coding").unwrap().unwrap()["code"], "600-7");
        assert!(
            matches!(p.one("dependency").unwrap(), Some(ParamValue::Parts(parts)) if parts.len() == 1)
        );
        assert!(p.text("coding").is_err());
        assert!(p.only(&["url", "count", "coding", "dependency"]).is_err());
        assert!(
            p.only(&["url", "count", "coding", "dependency", "filter"])
                .is_ok()
        );
    }

    #[test]
    fn a_body_that_is_not_parameters_is_refused_at_resource_type() {
        let e = OperationParams::read(None, br#"{"resourceType":"Patient"}"#).unwrap_err();
        assert_eq!(e.issues()[0].expression.as_deref(), Some("resourceType"));
        let e = OperationParams::read(
            None,
            br#"{"resourceType":"Parameters","parameter":[{"name":"x"}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.issues()[0].expression.as_deref(),
            Some("Parameters.parameter[0]")
        );
        let twice = OperationParams::read(Some("code=a&code=b"), b"").unwrap();
        assert!(twice.text("code").is_err());
    }
}
