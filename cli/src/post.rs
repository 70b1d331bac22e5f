//! `idem post URL`: one POST with an idempotency key, retried safely.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;
use idempotent_retry::{
    Error, IdempotencyKey, ServerConvention,
    operation::{Completed, GitKeyMode, OperationBuilder, OperationError, Resolution, WaitFailed},
    wait::{WaitError, WaitFor},
};
use reqwest::header::HeaderMap;
use serde_json::json;

use crate::common::{self, Exit, Failed, Format, SharedArgs, WaitArgs, body_value, fail, fail_with};

pub const EXAMPLES: &str = "\
Examples:
  # Create a CVM; a retry after a lost response is a replay, not a second CVM
  idem post https://cloud.example/cvms --json '{\"name\":\"web-1\"}' -H 'Authorization: Bearer $TOKEN'

  # Deploy the checked-out commit: the key is the clean HEAD SHA (none if the tree is dirty)
  idem post https://deploy.example/apps/api/deploy --key-from-git --server tower

  # Upload a report whose key goes in the body, from a file, printing one JSON summary; the key
  # derives from the run's identity, so a CI re-run on another machine sends the same one
  idem post https://bench.example/v0/run --json @report.json --server bencher --output json \\
      --derive-key \"report/$BRANCH/$SHA/$TESTBED\" --scope my-project

  # A django-idempotency-key server: its replays are the stored body under 409
  idem post https://shop.example/orders --json @order.json --server django

  # Create a CVM and wait until it runs; its id is journaled before the wait, so a re-run
  # after a kill resumes the wait instead of creating another (a 202 is followed anyway)
  idem post https://cloud.example/cvms --json '{\"name\":\"web-1\"}' \\
      --wait-for status=running --fail-on status=error --wait-timeout 900

A command is one operation (named after its method, URL and body). Running it again while the
journal holds it as pending (a crash, a kill -9, a CI retry) resumes its key: the server answers
with the original instead of creating twice. Once it succeeded, running it again answers from
the journal and sends nothing; `idem journal forget` it to send it as a new operation. With a
shared journal (--journal postgres://…) this holds on every machine: a machine that finds the
command running elsewhere waits for it and answers with its result.
A run whose outcome is unknown and that cannot be resumed (it was sent without a key) is never
sent again: check the server, then `idem journal forget` it.";

/// `idem post` options.
#[derive(Debug, Args)]
pub struct PostArgs {
    /// The URL to POST to.
    pub url: String,
    /// A JSON body: the JSON itself, @FILE, or @- for stdin. Invalid JSON exits 2.
    #[arg(long, value_name = "BODY", conflicts_with = "data_binary")]
    pub json: Option<String>,
    /// An opaque body: @FILE, @- for stdin, or the bytes themselves.
    #[arg(long, value_name = "@FILE")]
    pub data_binary: Option<String>,
    /// A header, 'Name: value'. Repeatable. A header named like the key's is the key to send.
    #[arg(short = 'H', long = "header", value_name = "'Name: value'")]
    pub headers: Vec<String>,
    /// Send this key. A bad key exits 2 before anything is sent.
    #[arg(long, value_name = "KEY", conflicts_with_all = ["no_idempotency_key", "key_from_git", "derive_key"])]
    pub idempotency_key: Option<String>,
    /// Derive the key from NAME and --scope (a UUID, the same on every machine: a CI re-run of
    /// the same upload sends the same key), and journal the operation as NAME. NAME names the
    /// logical operation, e.g. `report/$BRANCH/$SHA/$TESTBED`.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["no_idempotency_key", "key_from_git"])]
    pub derive_key: Option<String>,
    /// Send no key. A lost response then exits 3: the outcome is unknown.
    #[arg(long, conflicts_with = "key_from_git")]
    pub no_idempotency_key: bool,
    /// Use the clean HEAD SHA of the git working tree at DIR (default: .) as the key. On a dirty
    /// tree or outside a repository no key is sent, and stderr says why.
    #[arg(long, value_name = "DIR", num_args = 0..=1, require_equals = true, default_missing_value = ".")]
    pub key_from_git: Option<PathBuf>,
    /// Do not follow a `202 Accepted`'s Location or Operation-Location: print the 202.
    #[arg(long, conflicts_with = "wait_for")]
    pub no_follow: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub shared: SharedArgs,
}

/// Where the key comes from.
enum KeyChoice {
    Given(IdempotencyKey),
    Derived,
    Git(PathBuf),
    None,
    Random,
}

/// What is sent, read and checked before anything is.
struct Input {
    body: Vec<u8>,
    json: bool,
    /// Sent on every request; the key's own header is taken out (it is the key).
    headers: HeaderMap,
    key: KeyChoice,
}

pub async fn run(args: PostArgs) -> Exit {
    let format = args.shared.output.output;
    match post(args).await {
        Ok(exit) => exit,
        Err(failed) => failed.end(format),
    }
}

async fn post(args: PostArgs) -> Result<Exit, Failed> {
    let convention = args.shared.carrier.convention()?;
    let input = Input::read(&args, &convention)?;
    let deadline = args.shared.retry.deadline_or(60.0)?;
    let layer = common::layer(&convention, &args.shared.retry, deadline, args.shared.output.quiet)?;
    let (store, journal_path) = common::store(&args.shared.journal, &args.shared.scope).await?;
    let ops = common::operations(layer, store, &args.shared.scope, args.shared.retry.retention, input.headers.clone())?;
    // A derived key derives from the operation's name: the one the user gave.
    let name = args.derive_key.clone().unwrap_or_else(|| common::operation_name("POST", &args.url, &input.body));
    let quiet = args.shared.output.quiet;
    let progress = Progress::new(quiet);
    let mut op = input.operation(ops.operation(name).post(&args.url));
    // A 202 is followed unless told not to; --wait-for also follows what else a create starts.
    let wait = match args.wait.wait_for()? {
        Some(spec) => Some(spec),
        None if args.no_follow => None,
        None => Some(WaitFor::accepted().timeout(args.wait.timeout()?)),
    };
    if let Some(spec) = wait {
        op = op.wait(progress.hooked(spec));
    }
    let carrier = match convention.carrier.as_ref() {
        Some(c) => c.header_name().map_or_else(
            || format!("the body field `{}`", c.field_name().unwrap_or_default()),
            |n| format!("the `{n}` header"),
        ),
        None => "nowhere".to_owned(),
    };
    let mut report = Report {
        json: args.shared.output.output == Format::Json,
        quiet,
        named_convention: args.shared.carrier.named(),
        carrier,
        waited: false,
    };
    let result = match op.start().await {
        Ok(started) => {
            report.started(started.created());
            let result = started.wait().await;
            progress.finish();
            result
        }
        Err(e) => Err(e),
    };
    Ok(report.tell(result, journal_path.as_ref()))
}

/// Progress of a wait on stderr: a spinner on a terminal, else a line when the state changes.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::hidden();
            bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("a valid template"));
            bar
        });
        Self { bar, quiet }
    }

    /// `spec`, telling each poll.
    fn hooked(&self, spec: WaitFor) -> WaitFor {
        if self.quiet {
            return spec;
        }
        let bar = self.bar.clone();
        let last = std::sync::Mutex::new(None::<serde_json::Value>);
        spec.on_poll(move |e| {
            let state = if e.state.is_null() { "in progress".to_owned() } else { e.state.to_string() };
            let line = format!("waiting: {state} (poll {}, {}s)", e.poll, e.elapsed.as_secs());
            match &bar {
                Some(bar) => {
                    if bar.is_hidden() {
                        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                        bar.enable_steady_tick(std::time::Duration::from_millis(120));
                    }
                    bar.set_message(line);
                }
                None => {
                    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                    if last.as_ref() != Some(&e.state) {
                        eprintln!("idem: {line}");
                        *last = Some(e.state.clone());
                    }
                }
            }
        })
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Input {
    /// Everything that can be wrong with the input is found here, before anything is sent.
    fn read(args: &PostArgs, convention: &ServerConvention) -> Result<Self, Failed> {
        let (body, json) = match (&args.json, &args.data_binary) {
            (Some(json), _) => (common::json_body(json)?, true),
            (None, Some(data)) => (common::read_value(data, "--data-binary")?, false),
            (None, None) => (Vec::new(), false),
        };
        let mut headers = common::headers(&args.headers)?;
        let in_header = Self::key_in_headers(&mut headers, convention)?;
        let in_body = Self::key_in_body(&body, json, convention)?;
        let flag = match &args.idempotency_key {
            Some(key) => Some(
                IdempotencyKey::with_max_len(key.clone(), convention.max_key_len)
                    .map_err(|e| fail(Exit::Usage, format!("--idempotency-key: {e}; nothing was sent")))?,
            ),
            None => None,
        };
        // Every key the user gave is the same key, or none is sent.
        let mut given: Option<(IdempotencyKey, &str)> = None;
        for (key, from) in [(flag, "--idempotency-key"), (in_header, "-H"), (in_body, "the body")] {
            let Some(key) = key else { continue };
            match &given {
                Some((first, first_from)) if *first != key => {
                    return Err(fail(
                        Exit::Usage,
                        format!("{first_from} gives one idempotency key and {from} another; nothing was sent"),
                    ));
                }
                Some(_) => {}
                None => given = Some((key, from)),
            }
        }
        let key = match (given.map(|(key, _)| key), &args.key_from_git, args.no_idempotency_key) {
            (Some(_), _, _) if args.derive_key.is_some() => {
                return Err(fail(
                    Exit::Usage,
                    "an idempotency key is given (-H, --idempotency-key or the body), and --derive-key derives another; nothing was sent",
                ));
            }
            (None, None, false) if args.derive_key.is_some() => KeyChoice::Derived,
            (Some(_), Some(_), _) | (Some(_), _, true) => {
                return Err(fail(
                    Exit::Usage,
                    "an idempotency key is given (-H, --idempotency-key or the body), and another key source is named; nothing was sent",
                ));
            }
            (Some(key), None, false) => KeyChoice::Given(key),
            (None, Some(dir), _) => KeyChoice::Git(dir.clone()),
            (None, None, true) => KeyChoice::None,
            (None, None, false) if convention.carrier.is_none() => KeyChoice::None,
            (None, None, false) => KeyChoice::Random,
        };
        if convention.carrier.is_none() && !matches!(key, KeyChoice::None) {
            return Err(fail(Exit::Usage, format!("the {} server takes no key; nothing was sent", convention.name)));
        }
        Ok(Self { body, json, headers, key })
    }

    /// The key a `-H` option carries in the key's own header, taken out of the headers.
    fn key_in_headers(
        headers: &mut HeaderMap,
        convention: &ServerConvention,
    ) -> Result<Option<IdempotencyKey>, Failed> {
        let Some(carrier) = &convention.carrier else { return Ok(None) };
        let Some(name) = carrier.header_name().cloned() else { return Ok(None) };
        let key = carrier
            .existing_key(headers, None, convention.max_key_len)
            .map_err(|e| fail(Exit::Usage, format!("-H {name}: {e}")))?;
        headers.remove(&name);
        Ok(key)
    }

    /// The key a JSON body already carries in the convention's body field: the user's key, as
    /// a `-H` in the key's header is.
    fn key_in_body(body: &[u8], json: bool, convention: &ServerConvention) -> Result<Option<IdempotencyKey>, Failed> {
        let Some(carrier) = convention.carrier.as_ref().filter(|c| c.in_body()) else { return Ok(None) };
        if !json {
            return Ok(None);
        }
        let field = carrier.field_name().unwrap_or_default();
        carrier.existing_key(&HeaderMap::new(), Some(body), convention.max_key_len).map_err(|e| {
            fail(Exit::Usage, format!("the body's `{field}`: {}; nothing was sent", idempotent_retry::error::chain(&e)))
        })
    }

    /// The operation to send: once (the same command that succeeded is answered from the
    /// journal, never sent again).
    fn operation<'a>(&self, op: OperationBuilder<'a>) -> OperationBuilder<'a> {
        let mut op = op.body(self.body.clone()).once();
        if self.json {
            op = op.header("content-type", "application/json");
        }
        match &self.key {
            KeyChoice::Given(key) => op.key(key.clone()),
            KeyChoice::Derived => op.derived_key(1),
            KeyChoice::Git(dir) => op.key_from_git(dir, GitKeyMode::CleanOnly),
            KeyChoice::None => op.no_key(),
            KeyChoice::Random => op.random_key(),
        }
    }
}

/// How the outcome is told.
struct Report {
    json: bool,
    quiet: bool,
    /// The user named how the server takes keys (--server, --key-header, --key-field,
    /// --ietf-quote): where the key goes is their choice, not a default.
    named_convention: Option<String>,
    /// Where the key goes, as said to the user.
    carrier: String,
    /// There was something to wait for: the output is the resource as it ended.
    waited: bool,
}

impl Report {
    /// Says what was created and where it is waited for, before the wait: the id is known
    /// (and journaled) even if the wait never ends.
    fn started(&mut self, created: &Completed) {
        let Some(handle) = &created.handle else { return };
        self.waited = true;
        if self.quiet {
            return;
        }
        let id = created.identity.get("id").map(|id| format!(" {id}")).unwrap_or_default();
        let at = format!("{} {}", handle.pattern(), idempotent_retry::journal::redact_url(handle.url()));
        if created.resolution == Resolution::Resumed {
            eprintln!("idem: an earlier run created it{id}; resuming its wait at {at}");
        } else {
            eprintln!("idem: created{id}; waiting at {at}");
        }
    }

    fn tell(&self, result: Result<Completed, OperationError>, journal: Option<&String>) -> Exit {
        match result {
            Ok(done) => self.done(&done),
            Err(OperationError::Rejected { status, body, attempts, key, key_reuse, .. }) => {
                if !self.quiet {
                    eprintln!("idem: the server refused the request with {status}");
                }
                if key_reuse {
                    eprintln!(
                        "idem: the server says this key was used before with another payload: it will refuse this key with this body for as long as it keeps the key; use another key"
                    );
                }
                self.emit(&Told {
                    outcome: "rejected",
                    status: Some(status.as_u16()),
                    attempts,
                    key: key.as_ref(),
                    body: &body,
                    ..Told::default()
                });
                Exit::Refused
            }
            Err(e @ (OperationError::IdentityMismatch(_) | OperationError::Gone { .. })) => {
                self.failed(fail_with(Exit::Refused, &e), e.idempotency_key())
            }
            Err(OperationError::Wait(failed)) => self.not_ready(&failed, journal),
            Err(
                e @ (OperationError::InvalidOptions { .. }
                | OperationError::Journal(_)
                | OperationError::PayloadMismatch(_)),
            ) => self.failed(fail_with(Exit::Usage, &e), None),
            Err(e) => {
                let typed = match &e {
                    OperationError::GaveUp { source, .. } => Error::find(source),
                    _ => None,
                };
                let key = e.idempotency_key().cloned();
                let error = idempotent_retry::error::chain(&e);
                eprintln!("idem: {error}");
                explain_rerun(e.may_have_been_applied(), key.as_ref(), journal);
                let status = typed.and_then(Error::status).map(|s| s.as_u16());
                let attempts = typed.map_or(0, Error::attempts);
                self.emit(&Told {
                    outcome: "unknown",
                    status,
                    attempts,
                    key: key.as_ref(),
                    error: Some(&error),
                    ..Told::default()
                });
                Exit::Unknown
            }
        }
    }

    /// A run that ended on an error with no answer to show: the error is the output.
    fn failed(&self, failed: Failed, key: Option<&IdempotencyKey>) -> Exit {
        if self.json {
            let mut object = common::error_object(failed.exit, &failed.message);
            object["idempotency_key"] = key.map(IdempotencyKey::as_str).into();
            println!("{object}");
        }
        failed.exit
    }

    /// Created, not ready: a failure state is a refusal; anything else (the timeout, polls
    /// that failed) leaves it to a re-run, which resumes the wait.
    fn not_ready(&self, failed: &WaitFailed, journal: Option<&String>) -> Exit {
        eprintln!("idem: {}", idempotent_retry::error::chain(failed));
        let (outcome, exit) = match &failed.source {
            WaitError::Failed { .. } | WaitError::UnexpectedState { .. } => ("failed", Exit::Refused),
            WaitError::TimedOut { .. } => ("timed_out", Exit::Unknown),
            _ => ("wait_failed", Exit::Unknown),
        };
        match (journal, failed.handle.is_some()) {
            (Some(path), true) => eprintln!(
                "idem: it was created and is tracked in the journal at {}: re-running the same command resumes the wait, it never creates again",
                path
            ),
            (None, true) => eprintln!("idem: it was created; without a journal a re-run cannot resume the wait"),
            (_, false) => eprintln!("idem: it was created, and is on record; there is nowhere to wait for it"),
        }
        let resource = match &failed.source {
            WaitError::Failed { resource, .. } | WaitError::UnexpectedState { resource, .. } => Some(resource),
            WaitError::TimedOut { resource, .. } => resource.as_ref(),
            _ => None,
        };
        let body = resource.map(|r| serde_json::to_vec(r).expect("JSON serializes")).unwrap_or_default();
        let error = idempotent_retry::error::chain(failed);
        self.emit(&Told { outcome, key: failed.key.as_ref(), body: &body, error: Some(&error), ..Told::default() });
        exit
    }

    fn done(&self, done: &Completed) -> Exit {
        if let Some(why) = &done.no_key_reason {
            eprintln!("idem: no idempotency key from git: {why}; it was sent without one");
        }
        self.unacknowledged(done);
        // A create answered to a key sent before may be the server's unmarked replay of it:
        // told as resumed, never as a second create.
        let resumed = done.resolution == Resolution::Created && done.may_be_replay;
        let outcome = if resumed { "resumed" } else { done.resolution.as_str() };
        if done.resolution != Resolution::Created || resumed {
            let key = done.key.as_ref().map(|k| format!(" (key sha256:{})", k.fingerprint())).unwrap_or_default();
            let said = match done.resolution {
                Resolution::Replayed => format!("the server replayed its earlier response{key}"),
                Resolution::Resumed => {
                    format!("created by an earlier run{key}, which was waiting for it; nothing was sent")
                }
                Resolution::Created => format!(
                    "the key{key} had been sent before ({}), and the server marks no replays: this answer may be a replay of the first send, not a second resource",
                    if done.resumed {
                        "by an earlier run, resumed from the journal"
                    } else {
                        "by an attempt that may have reached the server"
                    }
                ),
                _ => format!("done earlier, by the journal's record{key}; nothing was sent"),
            };
            if !self.quiet {
                eprintln!("idem: {said}");
            }
        }
        let status = done.status.map(|s| s.as_u16());
        let body = match self.waited || (done.body.is_empty() && !done.resource.is_null()) {
            // The resource as the wait left it (not the create's first answer), or, when nothing
            // was sent, what the journal knows of it.
            true => serde_json::to_vec(&done.resource).expect("JSON serializes").into(),
            false => done.body.clone(),
        };
        self.emit(&Told {
            outcome,
            status,
            attempts: done.attempts,
            key: done.key.as_ref(),
            may_be_replay: done.may_be_replay,
            body: &body,
            ..Told::default()
        });
        Exit::Ok
    }

    /// A keyed create whose answer shows no sign that the server read the key, when the user
    /// did not say how the server takes keys: said once, since a server that ignores the header
    /// the key went in duplicates on every retry, and every answer looks like a create.
    fn unacknowledged(&self, done: &Completed) {
        if self.quiet
            || self.named_convention.is_some()
            || done.key.is_none()
            || done.key_acknowledged
            || !matches!(done.resolution, Resolution::Created | Resolution::Replayed)
        {
            return;
        }
        eprintln!(
            "idem: note: the answer shows no sign that the server read the key in {} (no replay marker, no echo); many servers that honour keys show none, but if this one takes keys another way (a body field, another header), a retry can create a duplicate. Name its convention with --server (or --key-header, --key-field), which also silences this note; see \"Does the server read the key?\" in docs/cli.md",
            self.carrier
        );
    }

    /// The output: the body (text), or one JSON object.
    fn emit(&self, told: &Told<'_>) {
        if self.json {
            let body = if told.body.is_empty() && told.status.is_none() {
                serde_json::Value::Null
            } else {
                body_value(told.body)
            };
            let value = json!({
                "outcome": told.outcome,
                "status": told.status,
                "attempts": told.attempts,
                "idempotency_key": told.key.map(IdempotencyKey::as_str),
                "replayed": told.outcome == "replayed",
                "may_be_replay": told.may_be_replay,
                "body": body,
                "error": told.error,
            });
            println!("{value}");
        } else {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(told.body);
            let _ = stdout.flush();
        }
    }
}

/// What a run tells on stdout.
#[derive(Default)]
struct Told<'a> {
    outcome: &'a str,
    status: Option<u16>,
    attempts: u32,
    key: Option<&'a IdempotencyKey>,
    /// The answer may be the server's replay of an earlier send of the key.
    may_be_replay: bool,
    body: &'a [u8],
    error: Option<&'a str>,
}

/// Says whether running the same command again is safe.
fn explain_rerun(may_have_been_applied: bool, key: Option<&IdempotencyKey>, journal: Option<&String>) {
    let applied = if may_have_been_applied { "it may have been applied" } else { "it was not applied" };
    match (key, journal) {
        (Some(key), Some(path)) => eprintln!(
            "idem: {applied}; re-running the same command is safe: it resumes key sha256:{} from the journal at {}",
            key.fingerprint(),
            path
        ),
        (Some(key), None) => eprintln!(
            "idem: {applied}; re-running is safe only with the same key (there is no journal): --idempotency-key {key}"
        ),
        (None, _) if may_have_been_applied => eprintln!(
            "idem: {applied}, and the request carried no key: re-running it is NOT safe; check the server, then `idem journal forget` the operation"
        ),
        (None, _) => eprintln!("idem: {applied}; re-running is safe"),
    }
}
