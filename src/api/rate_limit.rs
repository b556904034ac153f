//! Per-client request rate limits: each authenticated client has its own bucket
//! (`--rate-limit-per-second`, bursts of twice that); a client over it is answered 429 with
//! `Retry-After` and nothing runs. One noisy laboratory cannot starve the regions' reads.
//! Development mode (a single user) and the CapabilityStatement are not limited.
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::{AppState, Caller};
use crate::error::{Issue, operation_outcome};

/// The buckets of every client, by client id.
#[derive(Clone)]
pub struct RateLimits {
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
}

impl RateLimits {
    /// `per_second` 0: no limit.
    pub fn new(per_second: u32) -> RateLimits {
        let limiter = NonZeroU32::new(per_second).map(|n| {
            let burst = n.saturating_mul(NonZeroU32::new(2).expect("2 is not zero"));
            Arc::new(RateLimiter::keyed(Quota::per_second(n).allow_burst(burst)))
        });
        RateLimits { limiter }
    }

    /// `Err(seconds to wait)` when `client` is over its rate.
    pub fn check(&self, client: &str) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&client.to_string())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
            })?;
        // forget idle clients now and then so the map does not grow with every id ever seen
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
        Ok(())
    }
}

pub async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(Caller(caller)) = req.extensions().get::<Caller>()
        && !caller.development
        && let Err(wait) = state.rate_limits.check(&caller.id)
    {
        tracing::info!(client = %caller.id, wait, "rate limit reached");
        let outcome = operation_outcome(&[Issue::error(
            "throttled",
            format!(
                "client '{}' sent more requests than its rate allows: retry after {wait} s",
                caller.id
            ),
            None,
        )]);
        let mut response =
            super::format::fhir_json(StatusCode::TOO_MANY_REQUESTS, &outcome).into_response();
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&wait.max(1).to_string()).expect("digits are a valid header"),
        );
        return response;
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_has_its_own_bucket() {
        let limits = RateLimits::new(1);
        assert!(limits.check("a").is_ok());
        assert!(limits.check("a").is_ok()); // burst of 2
        assert!(limits.check("a").is_err());
        assert!(limits.check("b").is_ok());
        assert!(RateLimits::new(0).check("a").is_ok());
    }
}
