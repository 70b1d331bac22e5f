//! `idem ensure-count COLLECTION_URL --count N`: make a collection hold exactly N items.

use std::io::IsTerminal;

use clap::Args;
use idempotent_retry::{
    Reconciler,
    pagination::Pagination,
    reconcile::{Desired, Prune, StopReason},
};
use serde_json::Value;

use crate::common::{self, Exit, Failed, Format, SharedArgs, WaitArgs, fail};

pub const EXAMPLES: &str = "\
Examples:
  # Make sure a CVM has 5 replicas; creates carry per-slot keys, so a re-run creates nothing twice
  idem ensure-count https://cloud.example/apps/app-9/cvms/vm-1/replicas --count 5 \\
      --expect app_id=app-9 --expect vm_uuid=vm-1 -H 'Authorization: Bearer $TOKEN'

  # Scale down to 2, deleting surplus this operation created (never others, without --prune-foreign)
  idem ensure-count https://cloud.example/apps/app-9/cvms/vm-1/replicas --count 2 --prune

  # An endpoint that takes no key (Phala's replicas): lost creates are settled by listing
  idem ensure-count https://cloud.example/apps/app-9/cvms/vm-1/replicas --count 3 --no-idempotency-key

  # Done only when all 5 are running; one in `error` stops it (exit 1), and is kept
  idem ensure-count https://cloud.example/apps/app-9/cvms/vm-1/replicas --count 5 \\
      --wait-for status=running --fail-on status=error

Listing is GET COLLECTION_URL; each missing item is a POST COLLECTION_URL; surplus is deleted
with DELETE COLLECTION_URL/{id}. Bump --generation when the count rises after a scale-down.";

/// `idem ensure-count` options.
#[derive(Debug, Args)]
pub struct EnsureArgs {
    /// The collection: GET lists it, POST creates in it, DELETE {url}/{id} deletes from it.
    pub collection_url: String,
    /// How many items it must hold, at most 1000000 (a larger count exits 2).
    #[arg(long, value_name = "N")]
    pub count: usize,
    /// The body of each create: JSON, @FILE or @-.
    #[arg(long, value_name = "BODY", default_value = "{}")]
    pub json: String,
    /// A header, 'Name: value', on every request. Repeatable.
    #[arg(short = 'H', long = "header", value_name = "'Name: value'")]
    pub headers: Vec<String>,
    /// The field of the list response holding the items [default: the response if it is an
    /// array, else `items`, else `data`].
    #[arg(long, value_name = "FIELD")]
    pub items_field: Option<String>,
    /// The list's pages: FIELD (a dotted path or JSON pointer) holds the next page's URL, or,
    /// as FIELD=PARAM, a cursor sent back as the query parameter PARAM. Repeatable. Link
    /// headers, `next` URLs and the common cursors (`next_page_token`, `next_cursor`,
    /// `metadata.continue`, Stripe's `has_more`) are followed without it; a list that says
    /// there is more and cannot be followed stops the run (exit 3), never a short count.
    #[arg(long, value_name = "FIELD[=PARAM]")]
    pub next_field: Vec<String>,
    /// The most pages one list may take.
    #[arg(long, value_name = "N", default_value_t = Pagination::DEFAULT_MAX_PAGES)]
    pub max_pages: usize,
    /// The operation's name, from which the per-slot keys derive [default: a hash of the URL
    /// and the body].
    #[arg(long, value_name = "NAME")]
    pub operation: Option<String>,
    /// The generation of the per-slot keys.
    #[arg(long, value_name = "G", default_value_t = 1)]
    pub generation: u64,
    /// The field holding an item's id.
    #[arg(long, value_name = "FIELD", default_value = "id")]
    pub id_field: String,
    /// Each create's answer must have FIELD equal to VALUE (a JSON literal, or else a string),
    /// or the command exits 1. Repeatable.
    #[arg(long, value_name = "FIELD=VALUE")]
    pub expect: Vec<String>,
    /// Delete surplus items this operation created.
    #[arg(long)]
    pub prune: bool,
    /// With --prune, delete other surplus items too (never a named or protected one).
    #[arg(long, requires = "prune")]
    pub prune_foreign: bool,
    /// The endpoint takes no key: send none, and settle lost creates by listing.
    #[arg(long)]
    pub no_idempotency_key: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub shared: SharedArgs,
}

pub async fn run(args: EnsureArgs) -> Exit {
    let format = args.shared.output.output;
    match ensure(args).await {
        Ok(exit) => exit,
        Err(failed) => failed.end(format),
    }
}

async fn ensure(args: EnsureArgs) -> Result<Exit, Failed> {
    let (reconciler, bar) = reconciler(&args).await?;
    let mut reconciler = match &bar {
        Some(bar) => {
            let bar = bar.clone();
            reconciler.on_progress(move |r| bar.set_position(r.after as u64))
        }
        None if !args.shared.output.quiet => reconciler.on_progress(|r| {
            eprintln!(
                "idem: ensure-count: round {}: {}/{} present, {} created, {} deleted",
                r.rounds,
                r.after,
                r.desired,
                r.created.len(),
                r.deleted.len()
            );
        }),
        None => reconciler,
    };
    let result = reconciler.reconcile(&Desired::Count(args.count)).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let (report, exit, error) = match result {
        Ok(report) if report.converged => (report, Exit::Ok, None),
        Ok(report) => {
            eprintln!(
                "idem: {} surplus item(s) ({}) not deleted: {}",
                report.overshoot,
                report.overshoot_ids.join(", "),
                if args.prune {
                    "nothing proves this operation created them (see --prune-foreign)"
                } else {
                    "pass --prune to delete them"
                }
            );
            (report, Exit::Refused, Some("surplus items not deleted".to_owned()))
        }
        Err(e) => {
            let error = idempotent_retry::error::chain(&e);
            eprintln!("idem: {error}");
            let exit = match e.failure {
                StopReason::Identity(_)
                | StopReason::BadId { .. }
                | StopReason::Rejected { .. }
                | StopReason::Delete { .. }
                | StopReason::NotReady { .. } => Exit::Refused,
                StopReason::Operation(_) | StopReason::InvalidOptions(_) | StopReason::TooMany { .. } => Exit::Usage,
                _ => Exit::Unknown,
            };
            (*e.report, exit, Some(error))
        }
    };
    match args.shared.output.output {
        Format::Json => {
            let mut object = serde_json::to_value(&report).expect("a report serializes");
            object["error"] = error.into();
            println!("{object}");
        }
        Format::Text => println!("{report}"),
    }
    Ok(exit)
}

/// The reconciler the arguments describe, and a progress bar when stderr is a terminal.
async fn reconciler(args: &EnsureArgs) -> Result<(Reconciler, Option<indicatif::ProgressBar>), Failed> {
    if args.count > Desired::MAX {
        return Err(fail(
            Exit::Usage,
            format!("--count {}: a reconcile makes at most {} items; nothing was sent", args.count, Desired::MAX),
        ));
    }
    let body_bytes = common::json_body(&args.json)?;
    let body: Value = serde_json::from_slice(&body_bytes).expect("checked by json_body");
    if !body.is_object() {
        return Err(fail(Exit::Usage, "--json must be a JSON object"));
    }
    let expect = expectations(&args.expect)?;
    let headers = common::headers(&args.headers)?;
    let convention = args.shared.carrier.convention()?;
    if let Some(name) = convention.carrier.as_ref().and_then(|c| c.header_name()).filter(|n| headers.contains_key(*n)) {
        return Err(fail(
            Exit::Usage,
            format!("-H {name}: ensure-count derives a key for each item it creates; it cannot send one of yours"),
        ));
    }
    let keyless = args.no_idempotency_key || convention.carrier.is_none();

    // The run's deadline bounds every request in it; one request alone has the usual minute.
    let deadline = args.shared.retry.deadline_or(600.0)?;
    let request_deadline = deadline.min(std::time::Duration::from_secs(60));
    let layer = common::layer(&convention, &args.shared.retry, request_deadline, args.shared.output.quiet)?;
    let (store, _) = common::store(&args.shared.journal, &args.shared.scope).await?;
    let ops = common::operations(layer, store, &args.shared.scope, args.shared.retry.retention, headers)?;
    let operation = args.operation.clone().unwrap_or_else(|| {
        format!("ensure-count {}", common::operation_name("POST", &args.collection_url, &body_bytes))
    });
    let mut reconciler = Reconciler::new(ops, &args.collection_url, operation)
        .generation(args.generation)
        .create_body(body)
        .id_field(&args.id_field)
        .prune(args.prune())
        .deadline(deadline);
    if let Some(field) = &args.items_field {
        reconciler = reconciler.items_field(field);
    }
    let mut pages = Pagination::standard().max_pages(args.max_pages);
    for next in &args.next_field {
        pages = match next.split_once('=') {
            Some((field, param)) if !field.is_empty() && !param.is_empty() => pages.cursor(field, param),
            None if !next.is_empty() => pages.next_url(next),
            _ => return Err(fail(Exit::Usage, format!("--next-field {next:?}: expected FIELD or FIELD=PARAM"))),
        };
    }
    reconciler = reconciler.pagination(pages);
    for (field, value) in expect {
        reconciler = reconciler.expect_field(field, value);
    }
    if keyless {
        reconciler = reconciler.keyless();
    }
    if let Some(ready) = args.wait.wait_for()? {
        reconciler = reconciler.wait_for(ready);
    }
    let bar = (!args.shared.output.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(args.count as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message("ensure-count");
        bar
    });
    Ok((reconciler, bar))
}

/// `--expect FIELD=VALUE`s: VALUE a JSON scalar, or else a string.
fn expectations(expect: &[String]) -> Result<Vec<(String, Value)>, Failed> {
    expect
        .iter()
        .map(|e| {
            let (field, value) =
                e.split_once('=').ok_or_else(|| fail(Exit::Usage, format!("--expect {e:?}: expected FIELD=VALUE")))?;
            Ok((field.to_owned(), common::scalar(value)))
        })
        .collect()
}

impl EnsureArgs {
    /// What `--prune` and `--prune-foreign` allow.
    fn prune(&self) -> Prune {
        match (self.prune, self.prune_foreign) {
            (false, _) => Prune::Never,
            (true, false) => Prune::Ours,
            (true, true) => Prune::Any,
        }
    }
}
