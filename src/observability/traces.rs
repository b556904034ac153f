//! Logs and, when asked for, OpenTelemetry traces over OTLP/HTTP (protobuf), for a collector
//! (OpenTelemetry Collector, Tempo, Jaeger) at `--otlp-endpoint`.
//!
//! What a request span carries is chosen here, once: the route pattern (`/fhir/{type}/{id}`), the
//! method and the status (a delivery span, in the worker: its channel and failure). Never a URL, a query
//! string, an id or a header: searches carry codici fiscali, and a trace backend is not a place for
//! health data. Only this crate's own spans are exported, at `info`, whatever `RUST_LOG` says, so
//! the exporter's own HTTP client cannot trace itself.
use std::time::Duration;

use axum::extract::MatchedPath;
use axum::http::{Request, Response};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider};
use tracing::{Level, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// Where and how much to trace.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The collector's traces URL (`http://collector:4318/v1/traces`).
    pub endpoint: String,
    /// Share of requests traced (0.0–1.0); a request that arrives with a sampled `traceparent`
    /// is traced whatever the ratio (parent-based).
    pub sample_ratio: f64,
}

/// Keeps the exporter alive; dropping it sends the spans still buffered (bounded by the export
/// timeout) so that the last requests before a shutdown are not lost from the trace backend.
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("sentinella: traces not all exported at shutdown: {e}");
        }
    }
}

/// How long one export may take before the batch is given up (the collector is down).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Install the process's subscriber: logs to stdout (text or JSON, filtered by `RUST_LOG`,
/// default `info`) and, with `otlp`, this crate's spans to the collector. Call once, outside the
/// async runtime (the exporter's blocking client must not be built on a runtime thread).
pub fn init(json_logs: bool, otlp: Option<&OtlpConfig>) -> anyhow::Result<Guard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = if json_logs {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let Some(otlp) = otlp else {
        Registry::default()
            .with(logs.with_filter(filter))
            .try_init()?;
        return Ok(Guard { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(otlp.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            otlp.sample_ratio.clamp(0.0, 1.0),
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name("sentinella")
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        )
        .build();
    let tracer = provider.tracer("sentinella");
    global::set_text_map_propagator(TraceContextPropagator::new());
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target("sentinella", Level::INFO));
    Registry::default()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init()?;
    Ok(Guard {
        provider: Some(provider),
    })
}

/// The span of one HTTP request (for `TraceLayer::make_span_with`). Its parent is the caller's
/// W3C `traceparent`, when it sent one and traces are exported; nothing of the URL is recorded.
pub fn request_span<B>(req: &Request<B>) -> Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let method = req.method().as_str();
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let parent = global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(req.headers()))
    });
    // without a sampled remote parent this is a no-op: the span stays a root
    let _ = span.set_parent(parent);
    span
}

/// Records the answer's status on the request span (for `TraceLayer::on_response`); a 5xx marks
/// the span as failed, as OpenTelemetry's HTTP conventions say (a 4xx is the client's fault).
pub fn record_response<B>(response: &Response<B>, _latency: Duration, span: &Span) {
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}
