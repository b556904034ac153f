//! Sending one notification bundle: an HTTP POST (rest-hook) or a JetStream publish (NATS), each
//! acknowledged before the event counts as delivered.
use std::time::Duration;

use tokio::sync::OnceCell;

use super::spec::Channel;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("endpoint answered {0}")]
    Status(u16),
    #[error("cannot reach the endpoint: {0}")]
    Http(#[from] reqwest::Error),
    #[error("no NATS server is configured (--nats-url)")]
    NoBroker,
    #[error("NATS: {0}")]
    Nats(String),
}

pub struct Channels {
    http: reqwest::Client,
    nats_url: Option<String>,
    jetstream: OnceCell<async_nats::jetstream::Context>,
}

impl Channels {
    pub fn new(nats_url: Option<String>) -> Channels {
        Channels {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client with default TLS"),
            nats_url,
            jetstream: OnceCell::new(),
        }
    }

    async fn jetstream(&self) -> Result<&async_nats::jetstream::Context, SendError> {
        let url = self.nats_url.as_deref().ok_or(SendError::NoBroker)?;
        self.jetstream
            .get_or_try_init(|| async {
                let client = async_nats::connect(url)
                    .await
                    .map_err(|e| SendError::Nats(e.to_string()))?;
                Ok(async_nats::jetstream::new(client))
            })
            .await
    }

    pub async fn send(
        &self,
        channel: &Channel,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), SendError> {
        match channel {
            Channel::RestHook { endpoint, headers } => {
                let mut request = self
                    .http
                    .post(endpoint)
                    .timeout(timeout)
                    .header("content-type", "application/fhir+json");
                for (k, v) in headers {
                    request = request.header(k.as_str(), v.as_str());
                }
                let response = request.body(body).send().await?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(SendError::Status(response.status().as_u16()))
                }
            }
            Channel::Nats { subject } => {
                let js = self.jetstream().await?;
                let publish = async {
                    let ack = js
                        .publish(subject.clone(), body.into())
                        .await
                        .map_err(|e| SendError::Nats(e.to_string()))?;
                    // the stream has stored it
                    ack.await.map_err(|e| SendError::Nats(e.to_string()))?;
                    Ok(())
                };
                tokio::time::timeout(timeout, publish)
                    .await
                    .map_err(|_| SendError::Nats("no acknowledgement in time".into()))?
            }
        }
    }

    pub fn has_broker(&self) -> bool {
        self.nats_url.is_some()
    }
}
