//! Prometheus metrics: one recorder per process (tests build many servers in one process, and the
//! `metrics` facade has one global recorder), every metric named and described here, and the few
//! recording helpers the other layers call. Every label value comes from the server (a route
//! pattern, a resource type it serves, a rule set, a code of its own), never from what a client
//! sent, so no client can make the number of series grow.
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "sentinella_http_requests_total";
pub const HTTP_DURATION: &str = "sentinella_http_request_duration_seconds";
pub const BUNDLES_WRITTEN: &str = "sentinella_bundles_written_total";
pub const RESOURCES_WRITTEN: &str = "sentinella_resources_written_total";
pub const VALIDATION_FAILURES: &str = "sentinella_validation_failures_total";
pub const WRITES_IN_PROGRESS: &str = "sentinella_writes_in_progress";
pub const WRITER_QUEUE_DEPTH: &str = "sentinella_writer_queue_depth";
pub const COMMIT_GROUP_SIZE: &str = "sentinella_commit_group_size";
pub const CASES_CREATED: &str = "sentinella_cases_created_total";
pub const CASES_WITHDRAWN: &str = "sentinella_cases_withdrawn_total";
pub const DELIVERY_ATTEMPTS: &str = "sentinella_delivery_attempts_total";
pub const DELIVERY_FAILURES: &str = "sentinella_delivery_failures_total";
pub const DELIVERY_DURATION: &str = "sentinella_delivery_duration_seconds";
pub const OUTBOX_DEPTH: &str = "sentinella_subscription_outbox_depth";
pub const OUTBOX_OLDEST_AGE: &str = "sentinella_subscription_oldest_undelivered_age_seconds";
pub const OUTBOX_SUBSCRIPTIONS: &str = "sentinella_subscriptions_live";

/// Seconds: from a fast read (1 ms) to a Bundle at the write timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Transactions per SQLite group commit (the group is capped at 64).
const GROUP_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
/// Seconds a notification takes to reach its endpoint (capped by the delivery timeout).
const DELIVERY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// How often histogram samples are folded into their buckets when nobody scrapes (else they pile
/// up in memory until the next scrape).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

fn builder() -> PrometheusBuilder {
    // without buckets the exporter renders summaries, which cannot be aggregated across servers
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(COMMIT_GROUP_SIZE.into()), GROUP_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(DELIVERY_DURATION.into()), DELIVERY_BUCKETS)
        })
        .expect("bucket lists are not empty")
}

/// Install the process's recorder (once; later calls return the same handle).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let handle = match builder().install_recorder() {
            Ok(h) => h,
            Err(e) => {
                // another recorder owns the facade: /metrics can only show an empty registry
                tracing::error!(error = %e, "the Prometheus recorder could not be installed");
                builder().build_recorder().handle()
            }
        };
        describe();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no metrics upkeep thread: histograms are folded at scrapes only");
        }
        handle
    })
}

/// The exposition of every process-wide metric (installs the recorder if nobody did).
pub fn render() -> String {
    install().render()
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        Unit::Count,
        "HTTP requests answered, by route pattern, method and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time to answer an HTTP request (until the response head), by route pattern, method and status"
    );
    describe_counter!(
        BUNDLES_WRITTEN,
        Unit::Count,
        "Transaction and batch Bundles processed and committed, by Bundle type"
    );
    describe_counter!(
        RESOURCES_WRITTEN,
        Unit::Count,
        "Resources written by clients and committed, by resource type and interaction (create, update, delete, patch)"
    );
    describe_counter!(
        VALIDATION_FAILURES,
        Unit::Count,
        "Resources refused by validation, by kind (the FHIR issue type of the errors; a resource with errors of two kinds counts under both)"
    );
    describe_gauge!(
        WRITES_IN_PROGRESS,
        Unit::Count,
        "Write requests running now (admitted, not yet answered)"
    );
    describe_gauge!(
        WRITER_QUEUE_DEPTH,
        Unit::Count,
        "Write transactions waiting for the SQLite writer now (always 0 on PostgreSQL)"
    );
    describe_histogram!(
        COMMIT_GROUP_SIZE,
        Unit::Count,
        "Write transactions made durable by one SQLite group commit"
    );
    describe_counter!(
        CASES_CREATED,
        Unit::Count,
        "Case notifications created by the surveillance rules, by rule set and notification category"
    );
    describe_counter!(
        CASES_WITHDRAWN,
        Unit::Count,
        "Case notifications withdrawn (entered-in-error) by the surveillance rules, by rule set and notification category"
    );
    describe_counter!(
        DELIVERY_ATTEMPTS,
        Unit::Count,
        "Subscription notifications sent (handshakes, heartbeats, events), by channel"
    );
    describe_counter!(
        DELIVERY_FAILURES,
        Unit::Count,
        "Subscription notifications that failed, by channel and reason"
    );
    describe_histogram!(
        DELIVERY_DURATION,
        Unit::Seconds,
        "Time for one notification to be acknowledged or to fail, by channel"
    );
}

/// The HTTP method as a label: the standard ones by name, anything else (a client may send any
/// token) as `other`.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// One answered request; `route` is the matched route pattern (or a fixed label), never a path.
pub fn record_request(route: &str, method: &str, status: u16, elapsed: Duration) {
    let labels = [
        ("route", route.to_string()),
        ("method", method_label(method).to_string()),
        ("status", status.to_string()),
    ];
    metrics::counter!(HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(HTTP_DURATION, &labels).record(elapsed.as_secs_f64());
}

/// A committed transaction or batch Bundle.
pub fn bundle_written(bundle_type: &'static str) {
    metrics::counter!(BUNDLES_WRITTEN, "type" => bundle_type).increment(1);
}

/// `count` committed writes of `resource_type` (a type the server serves) by `interaction`.
pub fn resources_written(resource_type: &str, interaction: &'static str, count: u64) {
    if count > 0 {
        metrics::counter!(RESOURCES_WRITTEN, "type" => resource_type.to_string(), "interaction" => interaction)
            .increment(count);
    }
}

/// A resource refused by validation with errors of these kinds (FHIR issue types).
pub fn validation_failed<'a>(kinds: impl IntoIterator<Item = &'a str>) {
    let mut seen: Vec<&str> = Vec::new();
    for k in kinds {
        if !seen.contains(&k) {
            seen.push(k);
            metrics::counter!(VALIDATION_FAILURES, "kind" => k.to_string()).increment(1);
        }
    }
}

/// Counts one write as running while it lives (a dropped future included).
pub struct WriteInProgress(());

impl WriteInProgress {
    pub fn enter() -> WriteInProgress {
        metrics::gauge!(WRITES_IN_PROGRESS).increment(1.0);
        WriteInProgress(())
    }
}

impl Drop for WriteInProgress {
    fn drop(&mut self) {
        metrics::gauge!(WRITES_IN_PROGRESS).decrement(1.0);
    }
}

/// A transaction joined (`+1.0`) or left (`-1.0`) the SQLite writer's queue.
pub fn writer_queue(delta: f64) {
    metrics::gauge!(WRITER_QUEUE_DEPTH).increment(delta);
}

/// A SQLite group commit of `members` transactions.
pub fn commit_group(members: usize) {
    metrics::histogram!(COMMIT_GROUP_SIZE).record(members as f64);
}

/// A case notification created or withdrawn by `rule_set` (`cre`, `dm1990`).
pub fn case_created(rule_set: &'static str, category: &str) {
    metrics::counter!(CASES_CREATED, "rule_set" => rule_set, "category" => category.to_string())
        .increment(1);
}

pub fn case_withdrawn(rule_set: &'static str, category: &str) {
    metrics::counter!(CASES_WITHDRAWN, "rule_set" => rule_set, "category" => category.to_string())
        .increment(1);
}

/// One notification sent on `channel` (`rest-hook`, `nats`): `failure` is why it failed.
pub fn delivery(channel: &'static str, failure: Option<&'static str>, elapsed: Duration) {
    metrics::counter!(DELIVERY_ATTEMPTS, "channel" => channel).increment(1);
    if let Some(reason) = failure {
        metrics::counter!(DELIVERY_FAILURES, "channel" => channel, "reason" => reason).increment(1);
    }
    metrics::histogram!(DELIVERY_DURATION, "channel" => channel).record(elapsed.as_secs_f64());
}

/// The undelivered events of one subscription, as read at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxGauge {
    pub subscription: String,
    /// The topic's name (the last segment of its canonical URL).
    pub topic: String,
    pub status: String,
    pub depth: i64,
    /// Seconds since the oldest undelivered event occurred (0: none waits).
    pub oldest_age_secs: f64,
}

/// The per-subscription gauges, computed fresh for each scrape in a recorder of their own: a
/// subscription that ended simply stops appearing (the process-wide recorder cannot forget a
/// series). `listed` is how many subscriptions have undelivered events or are live; `rows` may be
/// fewer (the cap).
pub fn render_outbox(rows: &[OutboxGauge], listed: usize) -> String {
    let recorder = builder().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        describe_gauge!(
            OUTBOX_DEPTH,
            Unit::Count,
            "Events of a live subscription not yet delivered (numbered and waiting to be numbered)"
        );
        describe_gauge!(
            OUTBOX_OLDEST_AGE,
            Unit::Seconds,
            "Age of a live subscription's oldest undelivered event (0 when none waits)"
        );
        describe_gauge!(
            OUTBOX_SUBSCRIPTIONS,
            Unit::Count,
            "Live subscriptions (requested, active, error); per-subscription series are capped, this is not"
        );
        metrics::gauge!(OUTBOX_SUBSCRIPTIONS).set(listed as f64);
        for r in rows {
            let labels = [
                ("subscription", r.subscription.clone()),
                ("topic", r.topic.clone()),
                ("status", r.status.clone()),
            ];
            metrics::gauge!(OUTBOX_DEPTH, &labels).set(r.depth as f64);
            metrics::gauge!(OUTBOX_OLDEST_AGE, &labels).set(r.oldest_age_secs);
        }
    });
    recorder.handle().render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("BREW"), "other");
        assert_eq!(method_label("get"), "other");
    }

    #[test]
    fn outbox_series_are_those_of_the_scrape_only() {
        let row = |id: &str, depth| OutboxGauge {
            subscription: id.into(),
            topic: "cre-case".into(),
            status: "active".into(),
            depth,
            oldest_age_secs: 1.5,
        };
        let first = render_outbox(&[row("a", 3), row("b", 0)], 2);
        assert!(first.contains(
            "sentinella_subscription_outbox_depth{subscription=\"a\",topic=\"cre-case\",status=\"active\"} 3"
        ), "{first}");
        assert!(first.contains("sentinella_subscriptions_live 2"), "{first}");
        let second = render_outbox(&[row("b", 1)], 1);
        assert!(!second.contains("subscription=\"a\""), "{second}");
        assert!(
            second.contains("# TYPE sentinella_subscription_oldest_undelivered_age_seconds gauge"),
            "{second}"
        );
    }
}
