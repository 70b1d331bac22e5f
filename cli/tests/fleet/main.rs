//! `idem` processes as the machines of a fleet sharing one PostgreSQL journal (the server
//! libpq's environment names, as `pg_virtualenv` exports them; see the library's
//! `tests/postgres`). Without one the tests say so and pass, unless `CI=true`.
//!
//! ```sh
//! pg_virtualenv cargo test -p idempotent-retry-cli --test fleet
//! ```

mod machines;
// The library's PostgreSQL test support: where the server is, journals in schemas of their own.
#[path = "../../../tests/postgres/support.rs"]
#[allow(dead_code)] // the fault and pooling helpers are the library suite's
mod support;
