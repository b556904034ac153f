//! Terminology benchmark (issue 13, item 6, first half): `ValueSet/$validate-code` against a
//! ValueSet of 1,000+ codes at 20,000 requests/s or more over HTTP, and what each terminology
//! operation costs. A benchmark, not a timed test: it asserts answers, never figures.
//!
//! Three measures, each printed as a table:
//! 1. **In process, the operations alone** (`sentinella::terminology::operations::Registry`, no
//!    HTTP): `$validate-code` in D.M. 1990 class V (704 ICD-9-CM codes, expanded once through the
//!    hierarchy) and in the whole of ICD-9-CM (17,732 codes, its implicit value set
//!    `http://hl7.org/fhir/sid/icd-9-cm?fhir_vs`), a member and a non-member each; a 100-code page
//!    of `$expand`; a filtered `$expand` over all of ICD-9-CM; `$lookup`; `$subsumes`;
//!    `$translate` of a laboratory's local code. Mean ns per call over `SENTINELLA_BENCH_ITER`
//!    calls (default 200,000; a tenth for the expansions).
//! 2. **In process, through the router** (`sentinella::server::build_app` on a temporary SQLite
//!    file, `tower::ServiceExt::oneshot`: every middleware — trace, XML, authentication, rate
//!    limit, policy, audit — but no sockets), one request at a time: the server's CPU per request.
//!    Then where it goes: the same request through routers that add the server's layers one at a
//!    time (handler alone, + audit trail, + policy, + rate limit, + XML, + body timeout / catch-panic
//!    / trace, then the server's own router), each step's added µs.
//! 3. **Over HTTP with wrk** against the server binary of this build (`cargo bench` builds it in
//!    the release profile), started in development mode (no token) on a free loopback port with a
//!    temporary SQLite file: `wrk -t2 -c32 -d15s --latency <url>` per URL (`SENTINELLA_BENCH_WRK_*`
//!    below). Each URL is first checked to answer 200 with the expected `result`. Skipped when
//!    `wrk` is not installed (`apt-get install -y wrk`) or `SENTINELLA_BENCH_WRK=0`.
//!
//! ```sh
//! cargo bench --bench terminology
//! SENTINELLA_BENCH_WRK_DURATION=30s SENTINELLA_BENCH_WRK_CONNECTIONS=64 cargo bench --bench terminology
//! SENTINELLA_BENCH_URL=http://127.0.0.1:8080/fhir cargo bench --bench terminology   # a running server
//! ```
//! By hand, against the release binary (what the closing note of issue 13 quotes):
//! ```sh
//! cargo build --release
//! target/release/sentinella serve --listen 127.0.0.1:8090 --database sqlite:///tmp/tx.db &
//! wrk -t2 -c32 -d15s --latency 'http://127.0.0.1:8090/fhir/ValueSet/$validate-code?url=http%3A%2F%2Fhl7.org%2Ffhir%2Fsid%2Ficd-9-cm%3Ffhir_vs&system=http%3A%2F%2Fhl7.org%2Ffhir%2Fsid%2Ficd-9-cm&code=041.3'
//! ```
use std::hint::black_box;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use sentinella::terminology::operations::{
    CodingIn, ExpandIn, LookupIn, Registry, SubsumesIn, Target, TranslateIn, ValidateIn,
};
use serde_json::Value;
use tower::ServiceExt;

const ICD9: &str = "http://hl7.org/fhir/sid/icd-9-cm";
const CANON: &str = "https://sentinella-fhir.github.io/ig";
const NIGUARDA: &str = "https://lis.niguarda.example/codici";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Mean ns per call of `f` over `n` calls (after a warm-up of a tenth).
fn time<T>(n: u64, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..n / 10 {
        black_box(f());
    }
    let t = Instant::now();
    for _ in 0..n {
        black_box(f());
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn validate_in(url: &str, code: &str) -> ValidateIn {
    ValidateIn {
        target: Target::url(url),
        system: Some(ICD9.into()),
        code: Some(code.into()),
        ..ValidateIn::default()
    }
}

fn in_process(iter: u64) -> Result<()> {
    let t = Instant::now();
    let reg = Registry::get();
    println!(
        "registry built in {:.0} ms (code systems indexed, every ValueSet expanded)",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let class5 = format!("{CANON}/ValueSet/dm1990-classe-5");
    let whole = format!("{ICD9}?fhir_vs");
    let size = reg.value_set_size(&class5).context("class V expands")?;
    println!("dm1990-classe-5: {size} codes; {ICD9}?fhir_vs: the whole of ICD-9-CM");
    // the answers first: a benchmark of wrong answers measures nothing
    let check = |url: &str, code: &str, expected: bool| -> Result<()> {
        let v = reg.validate_code(&validate_in(url, code))?;
        ensure!(v.result == expected, "{url} {code}: {v:?}");
        Ok(())
    };
    check(&class5, "088.81", true)?;
    check(&class5, "003.0", false)?;
    check(&whole, "041.3", true)?;
    check(&whole, "041.99", false)?;
    let page = ExpandIn {
        target: Target::id("dm1990-classe-5"),
        count: Some(100),
        offset: Some(300),
        ..ExpandIn::default()
    };
    let filtered = ExpandIn {
        target: Target::url(&whole),
        filter: Some("pulmonary tuberc".into()),
        ..ExpandIn::default()
    };
    let lookup = LookupIn {
        system: Some(ICD9.into()),
        code: Some("011.93".into()),
        ..LookupIn::default()
    };
    let subsumes = SubsumesIn {
        system: Some(ICD9.into()),
        code_a: Some("010-018".into()),
        code_b: Some("011.93".into()),
        ..SubsumesIn::default()
    };
    let translate = TranslateIn {
        coding: Some(CodingIn::from_token(&format!("{NIGUARDA}|MEM-I"))),
        ..TranslateIn::default()
    };
    ensure!(reg.translate(&translate)?.result, "MEM-I maps to LOINC");
    println!("\n| operation (in process, no HTTP) | ns/call |\n|---|---|");
    let validate_rows: [(&str, &str, &str); 4] = [
        (
            "$validate-code, class V (704 codes), member",
            &class5,
            "088.81",
        ),
        ("$validate-code, class V, not a member", &class5, "003.0"),
        (
            "$validate-code, ICD-9-CM?fhir_vs (17,732), member",
            &whole,
            "041.3",
        ),
        (
            "$validate-code, ICD-9-CM?fhir_vs, unknown code",
            &whole,
            "041.99",
        ),
    ];
    for (label, url, code) in validate_rows {
        let input = validate_in(url, code);
        let ns = time(iter, || {
            reg.validate_code(&input).map(|v| v.to_parameters())
        });
        println!("| {label} (with its Parameters) | {ns:.0} |");
    }
    let ns = time(iter / 10, || reg.expand(&page));
    println!("| $expand class V, count=100 offset=300 | {ns:.0} |");
    let ns = time(iter / 100, || reg.expand(&filtered));
    println!("| $expand ICD-9-CM?fhir_vs filter='pulmonary tuberc' (17,732 scanned) | {ns:.0} |");
    let ns = time(iter, || reg.lookup(&lookup));
    println!("| $lookup ICD-9-CM 011.93 (all properties) | {ns:.0} |");
    let ns = time(iter, || reg.subsumes(&subsumes));
    println!("| $subsumes 010-018 / 011.93 | {ns:.0} |");
    let ns = time(iter, || {
        reg.translate(&translate).map(|t| t.to_parameters())
    });
    println!("| $translate Niguarda MEM-I (every map) | {ns:.0} |");
    Ok(())
}

/// The URLs measured over HTTP, with the `result` each must give.
fn urls() -> Vec<(&'static str, String, bool)> {
    let whole = enc(&format!("{ICD9}?fhir_vs"));
    let icd9 = enc(ICD9);
    vec![
        (
            "ICD-9-CM?fhir_vs (17,732 codes), type level, member",
            format!("/ValueSet/$validate-code?url={whole}&system={icd9}&code=041.3"),
            true,
        ),
        (
            "ICD-9-CM?fhir_vs, unknown code",
            format!("/ValueSet/$validate-code?url={whole}&system={icd9}&code=041.99"),
            false,
        ),
        (
            "ValueSet/dm1990-classe-5 (704 codes), instance, member",
            format!("/ValueSet/dm1990-classe-5/$validate-code?system={icd9}&code=088.81"),
            true,
        ),
    ]
}

async fn router_in_process(iter: u64) -> Result<()> {
    let path = std::env::temp_dir().join(format!(
        "sentinella-terminology-bench-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    let config = sentinella::config::Config::with_database(format!("sqlite://{}", path.display()));
    let app = sentinella::server::build_app(config).await?;
    println!(
        "\n| request (in process, through the router and every middleware) | µs/request | requests/s on one core |\n|---|---|---|"
    );
    for (label, url, expected) in urls() {
        let call = || async {
            let req = Request::get(format!("/fhir{url}"))
                .body(Body::empty())
                .expect("request");
            let resp = app.clone().oneshot(req).await.expect("router answers");
            let status = resp.status();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (status, bytes)
        };
        let (status, bytes) = call().await;
        ensure!(status == StatusCode::OK, "{url}: {status}");
        let v: Value = serde_json::from_slice(&bytes)?;
        ensure!(v["parameter"][0]["valueBoolean"] == expected, "{url}: {v}");
        for _ in 0..iter / 10 {
            black_box(call().await);
        }
        let t = Instant::now();
        for _ in 0..iter {
            black_box(call().await);
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / iter as f64;
        println!("| {label} | {us:.1} | {:.0} |", 1e6 / us);
    }
    drop(app);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(())
}

/// Where the router's time goes: the same request through routers that add the server's layers one
/// at a time (the order and kind of `sentinella::api::router`), then through the server's own
/// router. `authenticate` is private to the server: a layer that sets the development-mode caller
/// stands in for it, so its cost shows in the last step together with the full route table.
async fn middleware_attribution(iter: u64) -> Result<()> {
    use std::sync::Arc;

    use axum::Router;
    use axum::extract::Request as AxRequest;
    use axum::middleware::{Next, from_fn, from_fn_with_state};
    use axum::routing::get;
    use sentinella::api::{AppState, Caller, audit_trail, policy, rate_limit, terminology, xml};
    use sentinella::auth::{Access, Principal};

    let path = std::env::temp_dir().join(format!(
        "sentinella-terminology-layers-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    let config = sentinella::config::Config::with_database(format!("sqlite://{}", path.display()));
    let store = sentinella::store::connect(&config.database).await?;
    let access = Arc::new(Access::development());
    let dispatcher = Arc::new(sentinella::subscriptions::dispatch::Dispatcher::new(
        access.clone(),
        false,
    ));
    let engine = Arc::new(
        sentinella::surveillance::Engine::new(None, dispatcher).map_err(anyhow::Error::msg)?,
    );
    let state = AppState {
        store: store.clone(),
        config: Arc::new(config.clone()),
        engine,
        access,
        writes: sentinella::api::write_task::WriteSlots::new(config.max_writes_in_flight),
        audit: sentinella::audit::AuditLog::start(store.clone(), None),
        rate_limits: rate_limit::RateLimits::new(config.rate_limit_per_second),
        readiness: sentinella::api::health::Readiness::writes_only(store),
    };
    async fn development_caller(mut req: AxRequest, next: Next) -> axum::response::Response {
        req.extensions_mut()
            .insert(Caller(Arc::new(Principal::development())));
        next.run(req).await
    }
    const ROUTE: &str = "/ValueSet/{id}/$validate-code";
    let handler = || {
        Router::new().route(
            ROUTE,
            get(terminology::validate_code_instance).post(terminology::validate_code_instance),
        )
    };
    let audited = || handler().route_layer(from_fn_with_state(state.clone(), audit_trail::record));
    let authorized = || audited().route_layer(from_fn_with_state(state.clone(), policy::authorize));
    let nest = |inner: Router<AppState>| Router::new().nest("/fhir", inner);
    let limited = || {
        nest(authorized())
            .layer(from_fn_with_state(state.clone(), rate_limit::limit))
            .layer(from_fn(development_caller))
    };
    let with_xml = || limited().layer(from_fn(xml::respond_in_xml_when_asked));
    let outer = || {
        with_xml()
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
                Duration::from_secs(30),
            ))
            .layer(tower_http::catch_panic::CatchPanicLayer::new())
            .layer(tower_http::trace::TraceLayer::new_for_http())
    };
    let variants: Vec<(&str, Router)> = vec![
        (
            "handler alone (routing, extractors, operation, JSON)",
            nest(handler()).with_state(state.clone()),
        ),
        (
            "+ audit_trail::record (route layer)",
            nest(audited())
                .layer(from_fn(development_caller))
                .with_state(state.clone()),
        ),
        (
            "+ policy::authorize (route layer)",
            nest(authorized())
                .layer(from_fn(development_caller))
                .with_state(state.clone()),
        ),
        ("+ rate_limit::limit", limited().with_state(state.clone())),
        (
            "+ xml::respond_in_xml_when_asked",
            with_xml().with_state(state.clone()),
        ),
        (
            "+ body timeout, catch-panic, trace",
            outer().with_state(state.clone()),
        ),
        (
            "the server's router (authenticate, every route)",
            sentinella::server::build_app(config.clone()).await?,
        ),
    ];
    let url = "/fhir/ValueSet/dm1990-classe-5/$validate-code?system=http%3A%2F%2Fhl7.org%2Ffhir%2Fsid%2Ficd-9-cm&code=088.81";
    println!("\n| router (in process, {url}) | µs/request | added by the step |\n|---|---|---|");
    let mut before = None;
    for (label, app) in variants {
        let call = || async {
            let req = Request::get(url).body(Body::empty()).expect("request");
            let resp = app.clone().oneshot(req).await.expect("router answers");
            let status = resp.status();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (status, bytes)
        };
        let (status, bytes) = call().await;
        ensure!(status == StatusCode::OK, "{label}: {status}");
        ensure!(
            serde_json::from_slice::<Value>(&bytes)?["parameter"][0]["valueBoolean"] == true,
            "{label}"
        );
        for _ in 0..iter / 10 {
            black_box(call().await);
        }
        let t = Instant::now();
        for _ in 0..iter {
            black_box(call().await);
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / iter as f64;
        let added = before
            .map(|b: f64| format!("{:+.1}", us - b))
            .unwrap_or_default();
        println!("| {label} | {us:.1} | {added} |");
        before = Some(us);
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(())
}

struct Server {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
    dir: PathBuf,
}

impl Server {
    fn spawn() -> Result<(Server, String)> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!(
            "sentinella-terminology-bench-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("server.log");
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinella"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database",
                &format!("sqlite://{}", dir.join("bench.db").display()),
                "--summary-every-minutes",
                "0",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("spawning the sentinella binary")?;
        let pid = child.id().context("the server exited immediately")?;
        Ok((
            Server {
                child,
                pid,
                log,
                dir,
            },
            format!("http://127.0.0.1:{port}/fhir"),
        ))
    }

    async fn stop(mut self) -> Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

async fn wait_ready(client: &reqwest::Client, base: &str, server: &mut Server) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < READY_TIMEOUT {
        if let Some(status) = server.child.try_wait()? {
            bail!("the server exited ({status}); see {}", server.log.display());
        }
        if let Ok(r) = client.get(format!("{base}/metadata")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the server was not ready within {READY_TIMEOUT:?}")
}

/// wrk's "Requests/sec:" and latency lines.
fn wrk_summary(out: &str) -> (String, String, String, String) {
    let find = |prefix: &str| {
        out.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    let errors = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Non-2xx") || l.starts_with("Socket errors"))
        .collect::<Vec<_>>()
        .join("; ");
    (
        find("Requests/sec:"),
        find("50%"),
        find("99%"),
        if errors.is_empty() {
            "none".into()
        } else {
            errors
        },
    )
}

async fn over_http() -> Result<()> {
    if std::env::var("SENTINELLA_BENCH_WRK").is_ok_and(|v| v == "0") {
        println!("\nwrk: skipped (SENTINELLA_BENCH_WRK=0)");
        return Ok(());
    }
    if std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("\nwrk: not installed (apt-get install -y wrk): the HTTP measure is skipped");
        return Ok(());
    }
    let duration = env_or("SENTINELLA_BENCH_WRK_DURATION", "15s");
    let threads = env_or("SENTINELLA_BENCH_WRK_THREADS", "2");
    let connections = env_or("SENTINELLA_BENCH_WRK_CONNECTIONS", "32");
    let client = reqwest::Client::new();
    let (server, base) = match std::env::var("SENTINELLA_BENCH_URL") {
        Ok(url) => (None, url.trim_end_matches('/').to_string()),
        Err(_) => {
            let (mut s, base) = Server::spawn()?;
            wait_ready(&client, &base, &mut s).await?;
            (Some(s), base)
        }
    };
    ensure!(
        base.starts_with("http://127.0.0.1") || base.starts_with("http://localhost"),
        "a local load test: loopback only ({base})"
    );
    println!(
        "\nover HTTP: {base} (server: {}), wrk -t{threads} -c{connections} -d{duration} --latency",
        if server.is_some() {
            "this build's binary, development mode, SQLite"
        } else {
            "already running"
        }
    );
    println!(
        "\n| $validate-code over HTTP | requests/s | p50 | p99 | errors |\n|---|---|---|---|---|"
    );
    let mut failed = None;
    for (label, path, expected) in urls() {
        let url = format!("{base}{path}");
        let check = async {
            let r = client.get(&url).send().await?;
            ensure!(r.status().is_success(), "{url}: {}", r.status());
            let v: Value = r.json().await?;
            ensure!(v["parameter"][0]["valueBoolean"] == expected, "{url}: {v}");
            Ok(())
        };
        if let Err(e) = check.await {
            failed = Some(e);
            break;
        }
        let out = std::process::Command::new("wrk")
            .args([
                &format!("-t{threads}"),
                &format!("-c{connections}"),
                &format!("-d{duration}"),
                "--latency",
                &url,
            ])
            .output()
            .context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (rps, p50, p99, errors) = wrk_summary(&text);
        println!("| {label} | {rps} | {p50} | {p99} | {errors} |");
        if std::env::var("SENTINELLA_BENCH_VERBOSE").is_ok() {
            println!("wrk {url}\n{text}");
        }
    }
    if let Some(s) = server {
        s.stop().await?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let iter = env_num("SENTINELLA_BENCH_ITER", 200_000).max(100);
    in_process(iter)?;
    router_in_process((iter / 10).max(100)).await?;
    middleware_attribution((iter / 10).max(100)).await?;
    over_http().await
}
