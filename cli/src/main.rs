//! `idem`: curl for writes that must happen exactly once.

mod common;
mod ensure;
mod journal;
mod post;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Whether the command line asks for `--output json` (read before it parses).
fn asks_for_json(args: impl Iterator<Item = String>) -> bool {
    let args: Vec<String> = args.collect();
    args.windows(2).any(|w| w[0] == "--output" && w[1] == "json") || args.iter().any(|a| a == "--output=json")
}

const ABOUT: &str =
    "curl for writes that must happen exactly once: idempotency keys that survive retries, crashes and re-runs";

const EXIT_CODES: &str = "\
Exit codes:
  0  succeeded, or the server replayed a success
  1  the server gave a final refusal (a status that is not retried), an identity mismatch,
     a surplus without --prune, or what was created reached a failure state while waited for
  2  usage or input error; nothing was sent
  3  the outcome is unknown, retries were exhausted, or a wait did not end (timeout, polls
     failing); stderr says whether re-running the same command is safe (it is when a key was
     journaled) and whether it resumes a wait";

const EXAMPLES: &str = "\
Examples:
  idem post https://cloud.example/cvms --json '{\"name\":\"web-1\"}'
  idem post https://deploy.example/deploy --key-from-git --key-header X-Tower-Idempotency-Key
  idem post https://cloud.example/cvms --json '{\"name\":\"web-1\"}' --wait-for status=running
  idem ensure-count https://cloud.example/apps/app-9/cvms/vm-1/replicas --count 5 --prune
  idem journal list --pending

Keys are journaled (SQLite, $XDG_STATE_HOME/idempotent-retry/journal.sqlite3) before the first
byte is sent, so a killed run resumes with its key instead of creating a duplicate.";

#[derive(Debug, Parser)]
#[command(name = "idem", version, about = ABOUT, after_help = EXIT_CODES, after_long_help = format!("{EXAMPLES}\n\n{EXIT_CODES}"))]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// POST with an idempotency key, retried safely.
    #[command(after_help = EXIT_CODES, after_long_help = format!("{}\n\n{EXIT_CODES}", post::EXAMPLES))]
    Post(Box<post::PostArgs>),
    /// Make a collection hold exactly N items, without overshoot.
    #[command(after_help = EXIT_CODES, after_long_help = format!("{}\n\n{EXIT_CODES}", ensure::EXAMPLES))]
    EnsureCount(Box<ensure::EnsureArgs>),
    /// Inspect and clear the journal.
    #[command(subcommand, after_long_help = journal::EXAMPLES)]
    Journal(journal::JournalCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && asks_for_json(std::env::args()) => {
            // JSON mode prints one object, always: a usage error too.
            let _ = e.print();
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default().trim_start_matches("error: ");
            println!("{}", common::error_object(common::Exit::Usage, first));
            return common::Exit::Usage.into();
        }
        Err(e) => e.exit(),
    };
    let exit = match cli.command {
        Command::Post(args) => post::run(*args).await,
        Command::EnsureCount(args) => ensure::run(*args).await,
        Command::Journal(command) => journal::run(command).await,
    };
    exit.into()
}
