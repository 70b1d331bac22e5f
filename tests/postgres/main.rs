//! The PostgreSQL journal against a real server (feature `postgres`).
//!
//! The server is the one libpq's environment names (`PGHOST`, `PGPORT`, `PGUSER`,
//! `PGPASSWORD`, `PGDATABASE`), as Debian's `pg_virtualenv` exports them for a throw-away
//! cluster:
//!
//! ```sh
//! pg_virtualenv cargo test --all-features --test postgres
//! ```
//!
//! Without one the tests say so and pass, unless `CI=true`: there a missing database is a
//! failure, never a skip. `IDEM_PG_CLUSTER="15 regress"` (what `.ci/run` sets inside
//! `pg_virtualenv`) lets the fault tests restart the server with `pg_ctlcluster`.

mod bouncer;
mod connections;
mod faults;
mod fleet;
mod rules;
mod support;
mod tls;
mod values;
