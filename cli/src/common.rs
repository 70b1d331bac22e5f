//! Options shared by the subcommands, and how they become a client, a journal and output.

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use idempotent_retry::{
    IdempotentRetry, KeyCarrier, Operations, RetryPolicy, ServerConvention,
    journal::{KeyStore, MemoryStore, PostgresJournal, SqliteJournal},
    wait::WaitFor,
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// The options `post` and `ensure-count` share.
#[derive(Debug, Args)]
pub struct SharedArgs {
    /// The caller's scope (account, tenant), part of every derived key.
    #[arg(long, value_name = "SCOPE", default_value = "")]
    pub scope: String,
    #[command(flatten)]
    pub carrier: CarrierArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub journal: JournalArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// The exit codes scripts depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Succeeded, or the server replayed a success.
    Ok = 0,
    /// A final refusal, an identity mismatch, or an overshoot without `--prune`.
    Refused = 1,
    /// A usage or input error. Nothing was sent.
    Usage = 2,
    /// The outcome is unknown, or retries were exhausted.
    Unknown = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// A run that ended before it had an outcome to report: its exit code, and what it said.
#[derive(Debug)]
pub struct Failed {
    pub exit: Exit,
    pub message: String,
}

impl Failed {
    /// Ends the run: with `--output json`, one object on stdout saying what went wrong (JSON
    /// mode prints one object, always); the exit code.
    pub fn end(self, format: Format) -> Exit {
        if format == Format::Json {
            println!("{}", error_object(self.exit, &self.message));
        }
        self.exit
    }
}

/// The object JSON mode prints for a run that ended in `exit` with `message`: the fields of a
/// post's answer (`outcome`, `status`, …), empty, and `error`.
pub fn error_object(exit: Exit, message: &str) -> serde_json::Value {
    let outcome = match exit {
        Exit::Ok => "ok",
        Exit::Refused => "refused",
        Exit::Usage => "not_sent",
        Exit::Unknown => "unknown",
    };
    serde_json::json!({
        "outcome": outcome,
        "status": null,
        "attempts": 0,
        "idempotency_key": null,
        "replayed": false,
        "may_be_replay": false,
        "body": null,
        "error": message,
    })
}

/// Prints `idem: message` to stderr; the failure, to end the run with.
pub fn fail(exit: Exit, message: impl std::fmt::Display) -> Failed {
    let message = message.to_string();
    eprintln!("idem: {message}");
    Failed { exit, message }
}

/// Prints an error with its causes on one line; the failure, to end the run with.
pub fn fail_with(exit: Exit, error: &dyn std::error::Error) -> Failed {
    fail(exit, idempotent_retry::error::chain(error))
}

/// How the server takes keys.
#[derive(Debug, Args)]
pub struct CarrierArgs {
    /// Follow a known server's convention for keys and replays: standard, ietf, stripe, brandur,
    /// django, express, bencher, tower, no-keys. The options below change it.
    #[arg(long, value_name = "NAME")]
    pub server: Option<String>,
    /// The header that carries the key [default: Idempotency-Key].
    #[arg(long, value_name = "NAME")]
    pub key_header: Option<String>,
    /// Put the key in this field of the JSON body instead of a header.
    #[arg(long, value_name = "NAME", conflicts_with = "key_header")]
    pub key_field: Option<String>,
    /// Send the key as an IETF Structured-Field string (quoted).
    #[arg(long, conflicts_with = "key_field")]
    pub ietf_quote: bool,
    /// A response header that marks a replay ("true", "1" or "?1"), besides Idempotent-Replayed
    /// and Idempotency-Replayed. Repeatable.
    #[arg(long, value_name = "NAME")]
    pub replay_header: Vec<String>,
    /// The status under which the server replays a stored success (django-idempotency-key: 409).
    #[arg(long, value_name = "CODE", value_parser = clap::value_parser!(u16).range(100..600))]
    pub replay_status: Option<u16>,
}

impl CarrierArgs {
    /// The option that names how the server takes keys, if the user gave one.
    pub fn named(&self) -> Option<String> {
        match (&self.server, &self.key_header, &self.key_field) {
            (Some(server), _, _) => Some(format!("--server {server}")),
            (_, Some(header), _) => Some(format!("--key-header {header}")),
            (_, _, Some(field)) => Some(format!("--key-field {field}")),
            _ if self.ietf_quote => Some("--ietf-quote".to_owned()),
            _ => None,
        }
    }

    /// The convention the options describe: `--server`'s (or the standard one), changed by the
    /// other options.
    pub fn convention(&self) -> Result<ServerConvention, Failed> {
        let mut convention = match &self.server {
            Some(name) => ServerConvention::named(name).ok_or_else(|| {
                let names: Vec<&str> = ServerConvention::all().iter().map(|c| c.name).collect();
                fail(Exit::Usage, format!("--server {name:?}: not a known server; one of {}", names.join(", ")))
            })?,
            None => ServerConvention::standard(),
        };
        if let Some(field) = &self.key_field {
            convention.carrier = Some(KeyCarrier::body_field(field.clone()));
        } else if let Some(name) = &self.key_header {
            let carrier = KeyCarrier::header(name)
                .map_err(|_| fail(Exit::Usage, format!("--key-header {name:?} is not a valid header name")))?;
            convention.carrier = Some(carrier);
        }
        if self.ietf_quote {
            let carrier = convention.carrier.take().unwrap_or_else(KeyCarrier::standard);
            convention.carrier = Some(carrier.quoted());
        }
        for name in &self.replay_header {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| fail(Exit::Usage, format!("--replay-header {name:?} is not a valid header name")))?;
            convention.replay = convention.replay.marker(name);
        }
        if let Some(code) = self.replay_status {
            let status = http::StatusCode::from_u16(code).expect("checked by clap");
            convention.replay = convention.replay.replay_status(status);
        }
        Ok(convention)
    }
}

/// How persistently to retry.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// The most attempts, the first included.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// The total time allowed, in seconds, waits included [default: 60 for post, 600 for
    /// ensure-count, whose every request gets at most what is left of it].
    #[arg(long, value_name = "SECS")]
    pub deadline: Option<f64>,
    /// The time allowed for one attempt, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub attempt_timeout: f64,
    /// How long the server keeps keys, in seconds. An older pending key is not resent.
    #[arg(long, value_name = "SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub retention: u64,
    /// Once the server throttles (429), pace every request to it at a rate that adapts (the
    /// AWS SDKs' adaptive retry mode): requests of one run wait for their turn instead of
    /// coming back in waves.
    #[arg(long)]
    pub adaptive: bool,
}

impl RetryArgs {
    /// The deadline asked for, or `default` seconds.
    pub fn deadline_or(&self, default: f64) -> Result<Duration, Failed> {
        seconds(self.deadline.unwrap_or(default), "--deadline")
    }
}

/// Where keys are kept.
#[derive(Debug, Args)]
pub struct JournalArgs {
    /// The journal: a SQLite file, or a PostgreSQL database shared by every machine
    /// (postgres://user@host/db) [default: $XDG_STATE_HOME/idempotent-retry/journal.sqlite3].
    #[arg(long, value_name = "PATH|URL", env = "IDEM_JOURNAL", conflicts_with = "no_journal")]
    pub journal: Option<String>,
    /// Keep keys in memory only: a re-run after a crash cannot resume.
    #[arg(long)]
    pub no_journal: bool,
    /// With a PostgreSQL journal: how long a run holds an operation before another machine
    /// may take it over, in seconds [default: 90]. Another machine that finds a live run
    /// waits for it and answers with its result; a run killed holds it until this runs out.
    #[arg(long, value_name = "SECS")]
    pub lease: Option<f64>,
}

/// A journal `--journal` names: a SQLite file, or a PostgreSQL database.
pub enum Journal {
    Sqlite(SqliteJournal),
    Postgres(PostgresJournal),
}

impl Journal {
    /// Opens the journal `spec` names (`None`: the default SQLite file) for `scope`. With
    /// `existing`, a SQLite file that is not there is an error, not a new journal. A URL of
    /// another scheme than `postgres://` or `postgresql://` is refused: it is no file.
    pub async fn open(spec: Option<&str>, scope: &str, existing: bool, lease: Option<f64>) -> Result<Self, Failed> {
        let spec = match spec {
            Some(spec) => spec.to_owned(),
            None => match SqliteJournal::default_path() {
                Some(path) => path.display().to_string(),
                None => {
                    return Err(fail(
                        Exit::Usage,
                        "no home directory for the journal; pass --journal PATH or --no-journal",
                    ));
                }
            },
        };
        let not_sent = |e: &dyn std::error::Error| {
            fail(Exit::Usage, format!("{}; nothing was sent", idempotent_retry::error::chain(e)))
        };
        if let Some((scheme, _)) = spec.split_once("://") {
            if !matches!(scheme.to_ascii_lowercase().as_str(), "postgres" | "postgresql") {
                return Err(fail(
                    Exit::Usage,
                    format!(
                        "--journal {}: a {scheme}:// URL is not a journal (a SQLite file's path, or a postgres:// URL); nothing was sent",
                        idempotent_retry::journal::redact_url(&spec)
                    ),
                ));
            }
            let mut builder = PostgresJournal::builder(&spec).scope(scope);
            if let Some(lease) = lease {
                builder = builder.lease(seconds(lease, "--lease")?);
            }
            let journal = builder.open().await.map_err(|e| not_sent(&e))?;
            return Ok(Journal::Postgres(journal));
        }
        let journal = if existing { SqliteJournal::open_existing(&spec) } else { SqliteJournal::open(&spec) };
        Ok(Journal::Sqlite(journal.map_err(|e| not_sent(&e))?))
    }

    /// Where it is, as it may be shown.
    pub fn location(&self) -> String {
        match self {
            Journal::Sqlite(j) => j.path().display().to_string(),
            Journal::Postgres(j) => j.location().to_owned(),
        }
    }

    /// The store.
    pub fn store(&self) -> Arc<dyn KeyStore> {
        match self {
            Journal::Sqlite(j) => Arc::new(j.clone()),
            Journal::Postgres(j) => Arc::new(j.clone()),
        }
    }
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The response body (post) or a summary (ensure-count), progress on stderr.
    Text,
    /// One JSON object on stdout.
    Json,
}

/// Waiting for what a create started.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until FIELD (a dotted path such as `status` or `action.status`, or a JSON pointer)
    /// holds one of the VALUEs (JSON literals, or else strings; strings compare without case).
    #[arg(long, value_name = "FIELD=VALUE[,VALUE]")]
    pub wait_for: Option<String>,
    /// The same FIELD holding one of these VALUEs means it will never be ready: stop waiting
    /// and exit 1.
    #[arg(long, value_name = "FIELD=VALUE[,VALUE]", requires = "wait_for")]
    pub fail_on: Option<String>,
    /// The most time to wait, in seconds (the request itself has --deadline).
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub wait_timeout: f64,
}

impl WaitArgs {
    /// What `--wait-for` and `--fail-on` ask for; `None` without `--wait-for`.
    pub fn wait_for(&self) -> Result<Option<WaitFor>, Failed> {
        let Some(wait_for) = &self.wait_for else { return Ok(None) };
        let (field, targets) = states(wait_for, "--wait-for")?;
        let mut spec = WaitFor::field(&field).target(targets).timeout(self.timeout()?);
        if let Some(fail_on) = &self.fail_on {
            let (failure_field, failures) = states(fail_on, "--fail-on")?;
            if failure_field != field {
                return Err(fail(
                    Exit::Usage,
                    format!("--fail-on names {failure_field:?}, --wait-for {field:?}: they must name the same field"),
                ));
            }
            spec = spec.failure(failures);
        }
        Ok(Some(spec))
    }

    /// The wait's time limit.
    pub fn timeout(&self) -> Result<Duration, Failed> {
        seconds(self.wait_timeout, "--wait-timeout")
    }
}

/// `FIELD=VALUE[,VALUE]`: the field, and each value as a JSON scalar or else a string.
fn states(text: &str, flag: &str) -> Result<(String, Vec<serde_json::Value>), Failed> {
    let (field, values) = text
        .split_once('=')
        .filter(|(field, values)| !field.is_empty() && !values.is_empty())
        .ok_or_else(|| fail(Exit::Usage, format!("{flag} {text:?}: expected FIELD=VALUE[,VALUE]")))?;
    Ok((field.to_owned(), values.split(',').map(scalar).collect()))
}

/// A JSON literal that is not an object or an array, or else the text as a string.
pub fn scalar(text: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .filter(|v| !v.is_object() && !v.is_array())
        .unwrap_or_else(|| serde_json::Value::String(text.to_owned()))
}

/// Output options.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// The output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// No progress or retry lines on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// A time limit given in seconds: more than zero (with no time nothing could be sent) and no
/// larger than a `Duration` holds.
fn seconds(value: f64, flag: &str) -> Result<Duration, Failed> {
    if !value.is_finite() || value <= 0.0 {
        return Err(fail(Exit::Usage, format!("{flag} {value}: must be more than 0 seconds; nothing was sent")));
    }
    Duration::try_from_secs_f64(value).map_err(|_| {
        fail(Exit::Usage, format!("{flag} {value}: too large (at most {} seconds); nothing was sent", u64::MAX))
    })
}

/// The retry layer for `convention`, each request within `deadline`.
pub fn layer(
    convention: &ServerConvention,
    retry: &RetryArgs,
    deadline: Duration,
    quiet: bool,
) -> Result<IdempotentRetry, Failed> {
    let policy = RetryPolicy::standard()
        .with_max_attempts(retry.max_attempts)
        .with_deadline(deadline)
        .with_attempt_timeout(seconds(retry.attempt_timeout, "--attempt-timeout")?);
    let mut builder = IdempotentRetry::builder().convention(convention).policy(policy);
    if retry.adaptive {
        builder = builder.adaptive();
    }
    if !quiet {
        builder = builder.on_retry(|e| {
            let key = e.key_fingerprint.as_deref().map(|k| format!(" [key sha256:{k}]")).unwrap_or_default();
            let wait = if e.delay < Duration::from_secs(1) {
                format!("{}ms", e.delay.as_millis())
            } else {
                format!("{:.1}s", e.delay.as_secs_f64())
            };
            eprintln!("idem: attempt {}/{} failed ({}), retrying in {wait}{key}", e.attempt, e.max_attempts, e.cause);
        });
    }
    Ok(builder.build())
}

/// The journal the options describe, and where it is (`None` in memory).
pub async fn store(journal: &JournalArgs, scope: &str) -> Result<(Arc<dyn KeyStore>, Option<String>), Failed> {
    if journal.no_journal {
        return Ok((Arc::new(MemoryStore::new()), None));
    }
    let opened = Journal::open(journal.journal.as_deref(), scope, false, journal.lease).await?;
    Ok((opened.store(), Some(opened.location())))
}

/// Operations through a fresh HTTPS client that sends `headers` on every request.
pub fn operations(
    layer: IdempotentRetry,
    store: Arc<dyn KeyStore>,
    scope: &str,
    retention: u64,
    headers: HeaderMap,
) -> Result<Operations, Failed> {
    let client = reqwest::Client::builder()
        .user_agent(concat!("idem/", env!("CARGO_PKG_VERSION")))
        // A write's redirect is its answer: the layer follows it within its origin, or stops.
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| fail(Exit::Usage, format!("cannot build the HTTP client: {e}")))?;
    let client = reqwest_middleware::ClientBuilder::new(client).with(layer).build();
    Ok(Operations::with_store(client, store).scope(scope).retention(Duration::from_secs(retention)))
}

/// A value given inline, as `@FILE`, or as `@-` (stdin).
pub fn read_value(value: &str, flag: &str) -> Result<Vec<u8>, Failed> {
    let Some(path) = value.strip_prefix('@') else { return Ok(value.as_bytes().to_vec()) };
    let read = if path == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map(|_| buf)
    } else {
        std::fs::read(path)
    };
    read.map_err(|e| fail(Exit::Usage, format!("{flag} {value}: {e}")))
}

/// A JSON body from `--json`, checked.
pub fn json_body(value: &str) -> Result<Vec<u8>, Failed> {
    let bytes = read_value(value, "--json")?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|e| fail(Exit::Usage, format!("--json is not valid JSON: {e}")))?;
    Ok(bytes)
}

/// A body as JSON when it parses, else as a string.
pub fn body_value(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// `-H 'Name: value'` options as headers. An error names the header, never its value (it may
/// be a token).
pub fn headers(values: &[String]) -> Result<HeaderMap, Failed> {
    let mut headers = HeaderMap::new();
    for (n, header) in values.iter().enumerate() {
        let Some((name, value)) = header.split_once(':') else {
            return Err(fail(
                Exit::Usage,
                format!("-H option {}: expected 'Name: value' (its text is not shown)", n + 1),
            ));
        };
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
            fail(Exit::Usage, format!("-H option {}: {:?} is not a valid header name", n + 1, name.trim()))
        })?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| fail(Exit::Usage, format!("-H {name}: the value is not a valid header value (not shown)")))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// A short, stable hash of a request, for default operation names: the first 12 hex digits of
/// its journal [`fingerprint`](idempotent_retry::journal::fingerprint).
pub fn short_hash(method: &str, url: &str, body: &[u8]) -> String {
    idempotent_retry::journal::fingerprint(method, url, body)[..12].to_owned()
}

/// The default name of an operation on `url`: the method, the URL without its secrets, and a
/// hash of the whole request.
pub fn operation_name(method: &str, url: &str, body: &[u8]) -> String {
    format!("{method} {} #{}", idempotent_retry::journal::redact_url(url), short_hash(method, url, body))
}
