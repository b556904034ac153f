//! Public key sets (JWKS, RFC 7517) that signed tokens are checked against: a client's registered
//! keys (SMART Backend Services) or an OIDC issuer's. A set comes from a file, read again whenever
//! its modification time (or size, or inode) changes, or from a URL, fetched on first use and again
//! when a token names a `kid` the cached copy lacks, at most once per [`REFETCH_INTERVAL`]. Either
//! way keys are rotated without a restart, and a set that cannot be had keeps the last good copy.
//!
//! Only signature keys the server verifies are kept: RSA (RS256, RS384) and EC on P-256 (ES256) or
//! P-384 (ES384); a key's `alg`, `use` and `key_ops`, when given, must agree.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};

/// The signature algorithms accepted from clients and issuers (SMART asks for RS384 and ES384).
pub const ALGORITHMS: [Algorithm; 4] = [
    Algorithm::RS384,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::ES256,
];

/// A URL's key set is fetched again, for an unknown `kid`, at most this often.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// Largest key set read from a file or a URL.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// How long a key set URL may take to answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no {alg:?} key {kid} in the registered key set")]
    NoKey { kid: String, alg: Algorithm },
    #[error("the registered key set is not available: {0}")]
    Unavailable(String),
}

/// The usable keys of a set.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Jwk>,
}

impl KeySet {
    /// A JWKS document (`{"keys": [...]}`); keys this server cannot use (encryption keys, other key
    /// types or curves, malformed entries) are left out, so one odd key does not spoil the set.
    pub fn parse(bytes: &[u8]) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
        let keys = doc
            .keys
            .into_iter()
            .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
            .filter(usable)
            .collect();
        Ok(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key that verifies `alg` under `kid`; without a `kid`, the set's only key for `alg`.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let mut candidates = self.keys.iter().filter(|k| fits(k, alg));
        let key = match kid {
            Some(kid) => candidates.find(|k| k.common.key_id.as_deref() == Some(kid))?,
            None => {
                let first = candidates.next()?;
                if candidates.next().is_some() {
                    return None;
                }
                first
            }
        };
        DecodingKey::from_jwk(key).ok()
    }
}

fn usable(k: &Jwk) -> bool {
    let sig = k
        .common
        .public_key_use
        .as_ref()
        .is_none_or(|u| *u == PublicKeyUse::Signature);
    let verify = k
        .common
        .key_operations
        .as_ref()
        .is_none_or(|ops| ops.contains(&KeyOperations::Verify));
    sig && verify && ALGORITHMS.iter().any(|a| fits(k, *a))
}

/// Can `k` verify `alg`?
fn fits(k: &Jwk, alg: Algorithm) -> bool {
    if k.common
        .key_algorithm
        .is_some_and(|ka| ka != KeyAlgorithm::from(alg))
    {
        return false;
    }
    match (&k.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256 | Algorithm::RS384) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        _ => false,
    }
}

/// Where a client's or an issuer's keys come from.
#[derive(Debug)]
pub enum KeySource {
    File(FileKeys),
    Url(UrlKeys),
}

impl KeySource {
    /// A key set file (read now, to refuse a wrong path or a broken file at start).
    pub fn file(path: PathBuf) -> Result<KeySource, String> {
        let bytes = read_capped(&path)?;
        let set = KeySet::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        if set.is_empty() {
            return Err(format!(
                "{}: no usable signature key (RSA, or EC on P-256 or P-384)",
                path.display()
            ));
        }
        let stamp = std::fs::metadata(&path).ok().map(|m| Stamp::of(&m));
        Ok(KeySource::File(FileKeys {
            cache: Mutex::new(stamp.map(|s| (s, Arc::new(set)))),
            path,
        }))
    }

    /// A key set URL: `https://…` (plain `http://` only on the loopback interface). Fetched on
    /// first use.
    pub fn url(url: &str) -> Result<KeySource, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("jwks_url {url}: {e}"))?;
        let loopback = matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
        if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
            return Err(format!(
                "jwks_url {url}: must be https:// (plain http:// only on the loopback interface)"
            ));
        }
        Ok(KeySource::Url(UrlKeys {
            url: url.to_string(),
            cache: Mutex::new(UrlCache::default()),
            fetching: tokio::sync::Mutex::new(()),
        }))
    }

    /// The key for a token's header (`kid`, `alg`).
    pub async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, KeyError> {
        let set = match self {
            KeySource::File(f) => f.current().await?,
            KeySource::Url(u) => return u.key(kid, alg).await,
        };
        set.find(kid, alg).ok_or_else(|| no_key(kid, alg))
    }
}

fn no_key(kid: Option<&str>, alg: Algorithm) -> KeyError {
    let kid = match kid {
        // a header field of the caller's: quoted, and never long
        Some(k) => format!("kid {:?}", k.chars().take(64).collect::<String>()),
        None => "without kid".to_string(),
    };
    KeyError::NoKey { kid, alg }
}

fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_JWKS_BYTES as u64 {
        return Err(format!(
            "{}: larger than {MAX_JWKS_BYTES} bytes",
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// What tells a changed file: modification time, size and (on Unix) inode, so that a set replaced
/// by a rename within one clock tick is still seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(m);
        #[cfg(not(unix))]
        let inode = 0;
        Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode,
        }
    }
}

#[derive(Debug)]
pub struct FileKeys {
    path: PathBuf,
    cache: Mutex<Option<(Stamp, Arc<KeySet>)>>,
}

impl FileKeys {
    /// The set as the file holds it now (read again only when it changed).
    async fn current(&self) -> Result<Arc<KeySet>, KeyError> {
        let cached = self.cache.lock().expect("key cache lock").clone();
        let stamp = match tokio::fs::metadata(&self.path).await {
            Ok(m) => Stamp::of(&m),
            Err(e) => {
                return match cached {
                    Some((_, set)) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "key set file unreadable: using the last good copy");
                        Ok(set)
                    }
                    None => Err(KeyError::Unavailable(e.to_string())),
                };
            }
        };
        if let Some((s, set)) = &cached
            && *s == stamp
        {
            return Ok(set.clone());
        }
        let path = self.path.clone();
        let read =
            tokio::task::spawn_blocking(move || read_capped(&path).and_then(|b| KeySet::parse(&b)))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        match read {
            Ok(set) => {
                let set = Arc::new(set);
                tracing::info!(path = %self.path.display(), keys = set.len(), "key set file read");
                *self.cache.lock().expect("key cache lock") = Some((stamp, set.clone()));
                Ok(set)
            }
            Err(e) => match cached {
                Some((_, set)) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "key set file unreadable: using the last good copy");
                    Ok(set)
                }
                None => Err(KeyError::Unavailable(e)),
            },
        }
    }
}

#[derive(Debug, Default)]
struct UrlCache {
    set: Option<Arc<KeySet>>,
    last_attempt: Option<Instant>,
}

#[derive(Debug)]
pub struct UrlKeys {
    url: String,
    cache: Mutex<UrlCache>,
    /// One fetch at a time; requests that need the fetch wait for it, the others use the cache.
    fetching: tokio::sync::Mutex<()>,
}

impl UrlKeys {
    fn cached(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let cache = self.cache.lock().expect("key cache lock");
        cache.set.as_ref().and_then(|s| s.find(kid, alg))
    }

    async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, KeyError> {
        if let Some(k) = self.cached(kid, alg) {
            return Ok(k);
        }
        let _one = self.fetching.lock().await;
        // a fetch that finished while this request waited may have brought the key
        if let Some(k) = self.cached(kid, alg) {
            return Ok(k);
        }
        let due = {
            let mut cache = self.cache.lock().expect("key cache lock");
            let due = cache
                .last_attempt
                .is_none_or(|t| t.elapsed() >= REFETCH_INTERVAL);
            if due {
                cache.last_attempt = Some(Instant::now());
            }
            due
        };
        if !due {
            return Err(no_key(kid, alg));
        }
        match fetch(&self.url).await {
            Ok(set) => {
                tracing::info!(url = %self.url, keys = set.len(), "key set fetched");
                let set = Arc::new(set);
                self.cache.lock().expect("key cache lock").set = Some(set.clone());
                set.find(kid, alg).ok_or_else(|| no_key(kid, alg))
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "key set fetch failed: keeping the last good copy");
                if self.cache.lock().expect("key cache lock").set.is_none() {
                    return Err(KeyError::Unavailable(e));
                }
                Err(no_key(kid, alg))
            }
        }
    }
}

fn http() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(Duration::from_secs(3))
            // a key set moves only by a change of the access file
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with rustls")
    })
}

async fn fetch(url: &str) -> Result<KeySet, String> {
    let mut resp = http()
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    KeySet::parse(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public half of a test key, with `kid` and the `extra` members.
    fn rsa(kid: &str, extra: serde_json::Value) -> serde_json::Value {
        let private = jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!(
            "../../tests/fixtures/keys/rsa-1.pem"
        ))
        .unwrap();
        let mut k =
            serde_json::to_value(Jwk::from_encoding_key(&private, Algorithm::RS256).unwrap())
                .unwrap();
        k.as_object_mut().unwrap().remove("alg");
        k["kid"] = kid.into();
        for (name, v) in extra.as_object().unwrap() {
            k[name] = v.clone();
        }
        k
    }

    #[test]
    fn only_signature_keys_that_fit_are_kept() {
        let doc = serde_json::json!({"keys": [
            rsa("a", serde_json::json!({"use": "sig", "alg": "RS384"})),
            rsa("enc", serde_json::json!({"use": "enc", "alg": "RSA-OAEP"})),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "broken"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.find(Some("a"), Algorithm::RS384).is_some());
        // the key says RS384: not for RS256
        assert!(set.find(Some("a"), Algorithm::RS256).is_none());
        assert!(set.find(Some("a"), Algorithm::ES384).is_none());
        assert!(set.find(Some("b"), Algorithm::RS384).is_none());
        // without a kid, the only key for the algorithm
        assert!(set.find(None, Algorithm::RS384).is_some());
        assert!(KeySet::parse(b"{\"kty\": \"RSA\"}").is_err());
    }

    #[test]
    fn only_https_or_loopback_urls() {
        assert!(KeySource::url("https://idp.example.org/jwks").is_ok());
        assert!(KeySource::url("http://127.0.0.1:9000/jwks").is_ok());
        assert!(KeySource::url("http://idp.example.org/jwks").is_err());
        assert!(KeySource::url("file:///etc/passwd").is_err());
    }

    #[tokio::test]
    async fn a_replaced_file_is_read_again() {
        let dir = std::env::temp_dir().join(format!("sentinella-jwks-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.json");
        let write = |kid: &str| {
            let tmp = dir.join("next.json");
            let doc = serde_json::json!({"keys": [rsa(kid, serde_json::json!({}))]});
            std::fs::write(&tmp, doc.to_string()).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write("one");
        let source = KeySource::file(path.clone()).unwrap();
        assert!(source.key(Some("one"), Algorithm::RS256).await.is_ok());
        write("two");
        assert!(source.key(Some("two"), Algorithm::RS256).await.is_ok());
        assert!(source.key(Some("one"), Algorithm::RS256).await.is_err());
        // a broken replacement keeps the last good copy
        std::fs::write(&path, "not json").unwrap();
        assert!(source.key(Some("two"), Algorithm::RS256).await.is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
