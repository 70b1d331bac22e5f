-- The journal's tables, as src/journal/postgres.rs creates them (schema version 1), in a
-- schema `t` of their own, for `journal.sql`. See docs/postgres.md ("What it costs").
DROP SCHEMA IF EXISTS t CASCADE;
CREATE SCHEMA t;
CREATE TABLE t.operations (
    scope TEXT NOT NULL, operation TEXT NOT NULL, key TEXT, method TEXT NOT NULL, url TEXT NOT NULL,
    fingerprint TEXT NOT NULL, state TEXT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
    status INTEGER, identity TEXT, fixed_key BOOLEAN NOT NULL, handle TEXT, lease_owner TEXT, lease_until TIMESTAMPTZ,
    PRIMARY KEY (scope, operation));
CREATE INDEX operations_by_key ON t.operations (scope, key);
