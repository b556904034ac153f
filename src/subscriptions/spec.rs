//! Reading a Subscription resource the way the Backport IG (1.1.0) writes one, and deciding whether
//! a client may have it: known topic, filters the topic offers, a supported channel, an endpoint the
//! client is allowed to use. Errors name the element (422).
use serde_json::{Value, json};

use super::topics::{self, Topic};
use crate::auth::{Principal, owner_system};
use crate::error::{ApiError, ApiResult, Issue};
use crate::fhir::datetime::parse_range;
use crate::store::{Condition, StoredResource, SubscriptionRow};
use crate::terminology::CANON;

pub const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";

/// The custom channel type for NATS JetStream (`backport-channel-type`).
pub fn nats_channel_system() -> String {
    format!("{CANON}/CodeSystem/canale-sottoscrizione")
}
pub const NATS_CHANNEL_CODE: &str = "nats-jetstream";

#[derive(Debug, Clone, PartialEq)]
pub enum Channel {
    RestHook {
        endpoint: String,
        headers: Vec<(String, String)>,
    },
    /// Publish to this JetStream subject.
    Nats { subject: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Empty,
    IdOnly,
    FullResource,
}

impl Content {
    pub fn code(self) -> &'static str {
        match self {
            Content::Empty => "empty",
            Content::IdOnly => "id-only",
            Content::FullResource => "full-resource",
        }
    }
}

/// A Subscription as the delivery code uses it.
#[derive(Debug)]
pub struct Spec {
    pub topic: &'static Topic,
    pub channel: Channel,
    pub content: Content,
    /// Every filter must match (each `backport-filter-criteria` is one search expression).
    pub filters: Vec<Condition>,
    pub heartbeat_secs: Option<i64>,
    /// Seconds to wait for the endpoint (`backport-timeout`).
    pub timeout_secs: Option<i64>,
    pub end_at: Option<i64>,
    pub status: String,
    pub owner: String,
}

fn ext<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    let url = format!("{BACKPORT}/{name}");
    v["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"].as_str() == Some(url.as_str()))
}

fn invalid(code: &'static str, message: impl Into<String>, at: &str) -> Issue {
    Issue::error(code, message, Some(format!("Subscription.{at}")))
}

/// The owner recorded on a stored Subscription.
pub fn owner_of(resource: &Value) -> String {
    let system = owner_system();
    resource["meta"]["tag"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["system"].as_str() == Some(system.as_str()))
        .and_then(|t| t["code"].as_str())
        .unwrap_or_default()
        .to_string()
}

impl Spec {
    /// Read a Subscription; every problem found is reported, with its location.
    pub fn parse(resource: &Value) -> Result<Spec, Vec<Issue>> {
        let mut issues = Vec::new();
        let topic_url = resource["criteria"].as_str().unwrap_or_default();
        let topic = topics::topic(topic_url);
        if topic.is_none() {
            let known: Vec<&str> = topics::topics().iter().map(|t| t.url.as_str()).collect();
            issues.push(invalid(
                "not-supported",
                format!(
                    "unknown topic '{topic_url}': criteria must be a topic canonical, one of {}",
                    known.join(", ")
                ),
                "criteria",
            ));
        }
        let mut filters = Vec::new();
        if let Some(topic) = topic {
            for (i, f) in resource["_criteria"]["extension"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .filter(|(_, e)| {
                    e["url"].as_str() == Some(&format!("{BACKPORT}/backport-filter-criteria"))
                })
            {
                let at = format!("criteria.extension[{i}].valueString");
                let text = f["valueString"].as_str().unwrap_or_default();
                match parse_filter(topic, text) {
                    Ok(c) => filters.extend(c),
                    Err(e) => issues.push(invalid("value", e, &at)),
                }
            }
        }
        let channel = &resource["channel"];
        let custom = ext(&channel["_type"], "backport-channel-type")
            .map(|e| &e["valueCoding"])
            .filter(|c| c.is_object());
        let endpoint = channel["endpoint"].as_str().unwrap_or_default().to_string();
        let channel_kind = match (channel["type"].as_str(), custom) {
            (_, Some(c))
                if c["system"].as_str() == Some(nats_channel_system().as_str())
                    && c["code"] == NATS_CHANNEL_CODE =>
            {
                if valid_subject(&endpoint) {
                    Some(Channel::Nats { subject: endpoint })
                } else {
                    issues.push(invalid(
                        "value",
                        format!(
                            "'{endpoint}' is not a NATS subject (tokens of letters, digits, - and _ separated by dots; no wildcards)"
                        ),
                        "channel.endpoint",
                    ));
                    None
                }
            }
            (_, Some(c)) => {
                issues.push(invalid(
                    "not-supported",
                    format!(
                        "channel type {}|{} is not supported: use rest-hook, or {}|{NATS_CHANNEL_CODE}",
                        c["system"].as_str().unwrap_or_default(),
                        c["code"].as_str().unwrap_or_default(),
                        nats_channel_system()
                    ),
                    "channel.type",
                ));
                None
            }
            (Some("rest-hook"), None) => {
                if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
                    let headers = channel["header"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .enumerate()
                        .filter_map(|(i, h)| {
                            let h = h.as_str().unwrap_or_default();
                            match h.split_once(':') {
                                Some((k, v)) if !k.trim().is_empty() => {
                                    Some((k.trim().to_string(), v.trim().to_string()))
                                }
                                _ => {
                                    issues.push(invalid(
                                        "value",
                                        format!("header '{h}' is not 'Name: value'"),
                                        &format!("channel.header[{i}]"),
                                    ));
                                    None
                                }
                            }
                        })
                        .collect();
                    Some(Channel::RestHook { endpoint, headers })
                } else {
                    issues.push(invalid(
                        "value",
                        "a rest-hook endpoint must be an http:// or https:// URL",
                        "channel.endpoint",
                    ));
                    None
                }
            }
            (other, None) => {
                issues.push(invalid(
                    "not-supported",
                    format!(
                        "channel type '{}' is not supported: use rest-hook, or the NATS JetStream channel type",
                        other.unwrap_or_default()
                    ),
                    "channel.type",
                ));
                None
            }
        };
        if let Some(p) = channel["payload"].as_str()
            && p != "application/fhir+json"
        {
            issues.push(invalid(
                "not-supported",
                format!("payload '{p}' is not supported: use application/fhir+json"),
                "channel.payload",
            ));
        }
        let content = match ext(&channel["_payload"], "backport-payload-content")
            .and_then(|e| e["valueCode"].as_str())
        {
            None | Some("id-only") => Content::IdOnly,
            Some("empty") => Content::Empty,
            Some("full-resource") => Content::FullResource,
            Some(other) => {
                issues.push(invalid(
                    "code-invalid",
                    format!(
                        "payload content '{other}' is not one of empty, id-only, full-resource"
                    ),
                    "channel.payload.extension",
                ));
                Content::IdOnly
            }
        };
        let unsigned = |name: &str| {
            ext(channel, name)
                .and_then(|e| e["valueUnsignedInt"].as_i64())
                .filter(|v| *v > 0)
        };
        let end_at = match resource["end"].as_str() {
            Some(e) => match parse_range(e) {
                Some(r) => Some(r.start),
                None => {
                    issues.push(invalid(
                        "value",
                        format!("end '{e}' is not an instant"),
                        "end",
                    ));
                    None
                }
            },
            None => None,
        };
        match (topic, channel_kind, issues.is_empty()) {
            (Some(topic), Some(channel), true) => Ok(Spec {
                topic,
                channel,
                content,
                filters,
                heartbeat_secs: unsigned("backport-heartbeat-period"),
                timeout_secs: unsigned("backport-timeout"),
                end_at,
                status: resource["status"]
                    .as_str()
                    .unwrap_or("requested")
                    .to_string(),
                owner: owner_of(resource),
            }),
            _ => Err(issues),
        }
    }

    /// The endpoint as access rules see it (`nats:<subject>` for NATS).
    pub fn endpoint_key(&self) -> String {
        match &self.channel {
            Channel::RestHook { endpoint, .. } => endpoint.clone(),
            Channel::Nats { subject } => format!("nats:{subject}"),
        }
    }

    pub fn row(&self, id: &str) -> SubscriptionRow {
        SubscriptionRow {
            id: id.to_string(),
            topic: self.topic.url.clone(),
            owner: self.owner.clone(),
            status: self.status.clone(),
            events_count: 0,
            delivered_count: 0,
            attempts: 0,
            next_attempt_at: 0,
            last_sent_at: 0,
            heartbeat_secs: self.heartbeat_secs,
            end_at: self.end_at,
            last_error: None,
            pruned_count: 0,
            unnumbered: false,
        }
    }
}

fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `Communication?region=030&organism=041.3`: only the topic's filter parameters.
fn parse_filter(topic: &Topic, text: &str) -> Result<Vec<Condition>, String> {
    let (rt, query) = match text.split_once('?') {
        Some((rt, q)) => (rt, q),
        None => (topic.resource_type.as_str(), text),
    };
    if rt != topic.resource_type {
        return Err(format!(
            "the topic's events are {} resources, not {rt}",
            topic.resource_type
        ));
    }
    for (name, _) in form_urlencoded::parse(query.as_bytes()) {
        let base = name.split(':').next().unwrap_or_default();
        if topic.filter(base).is_none() {
            let offered: Vec<&str> = topic.filters.iter().map(|f| f.parameter.as_str()).collect();
            return Err(format!(
                "'{name}' is not a filter of {}: it offers {}",
                topic.url,
                offered.join(", ")
            ));
        }
    }
    topics::conditions(rt, query)
}

/// Decide whether `principal` may write this Subscription, and normalise it: the owner tag, and the
/// status the server starts from (`requested` until the handshake, unless the client asks `off`).
pub fn admit(
    principal: &Principal,
    resource: &mut Value,
    current: Option<&StoredResource>,
    has_broker: bool,
) -> ApiResult<()> {
    let current_body: Option<Value> = current
        .filter(|c| !c.deleted)
        .and_then(|c| c.body.as_deref())
        .and_then(|b| serde_json::from_str(b).ok());
    if let Some(c) = &current_body
        && !principal.development
        && principal.role != crate::auth::Role::Admin
        && owner_of(c) != principal.id
    {
        return Err(ApiError::NotFound(format!(
            "Subscription/{} is not one of yours",
            resource["id"].as_str().unwrap_or_default()
        )));
    }
    let spec = Spec::parse(resource).map_err(ApiError::unprocessable)?;
    if matches!(spec.channel, Channel::Nats { .. }) && !has_broker {
        return Err(ApiError::unprocessable(vec![invalid(
            "not-supported",
            "this server has no NATS server configured (--nats-url): use a rest-hook channel",
            "channel.type",
        )]));
    }
    if !principal.may_send_to(&spec.endpoint_key()) {
        return Err(ApiError::unprocessable(vec![invalid(
            "security",
            format!(
                "client '{}' may not have notifications sent to '{}' (allowed: {})",
                principal.id,
                spec.endpoint_key(),
                if principal.endpoints.is_empty() {
                    "none".to_string()
                } else {
                    principal.endpoints.join(", ")
                }
            ),
            "channel.endpoint",
        )]));
    }
    let previous = current_body.as_ref().and_then(|c| Spec::parse(c).ok());
    let same_channel = previous.as_ref().is_some_and(|p| {
        p.channel == spec.channel && p.topic.url == spec.topic.url && p.content == spec.content
    });
    let previous_status = current_body
        .as_ref()
        .and_then(|c| c["status"].as_str())
        .unwrap_or("requested");
    let asked = resource["status"].as_str().unwrap_or("requested");
    let status = match asked {
        "off" => "off",
        "requested" => "requested",
        // set active again after an error: delivery resumes where it stopped
        "active" if same_channel && previous_status != "off" => "active",
        "active" => "requested",
        other => {
            return Err(ApiError::unprocessable(vec![invalid(
                "business-rule",
                format!("a client cannot set status '{other}': use requested, active or off"),
                "status",
            )]));
        }
    };
    resource["status"] = json!(status);
    let owner = match &current_body {
        Some(c) => owner_of(c),
        None => principal.id.clone(),
    };
    set_owner(resource, &owner);
    if (status == "requested" || status == "active")
        && let Some(obj) = resource.as_object_mut()
    {
        obj.shift_remove("error");
    }
    Ok(())
}

fn set_owner(resource: &mut Value, owner: &str) {
    let system = owner_system();
    let meta = &mut resource["meta"];
    if !meta.is_object() {
        *meta = json!({});
    }
    let mut tags: Vec<Value> = meta["tag"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t["system"].as_str() != Some(system.as_str()))
        .collect();
    if !owner.is_empty() {
        tags.push(json!({"system": system, "code": owner}));
    }
    if tags.is_empty() {
        if let Some(m) = meta.as_object_mut() {
            m.shift_remove("tag");
        }
    } else {
        meta["tag"] = Value::Array(tags);
    }
}
