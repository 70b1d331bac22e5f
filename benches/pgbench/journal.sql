-- One begin and its finish as PostgresJournal sends them (the same three messages, with
-- literals): the bounds, the advisory lock and the claim in one message; the outcome's write;
-- then its COMMIT. A C client (pgbench) instead of ours, to tell the server's cost from the
-- client's:
--   pg_virtualenv bash -c 'psql -qf benches/pgbench/setup.sql &&
--     for c in 1 8; do pgbench -n -M simple -c $c -j $c -T 8 -f benches/pgbench/journal.sql; done'
\set n random(1, 2000000000)
SET LOCAL statement_timeout = 5000\; SET LOCAL lock_timeout = 5000\; SET LOCAL idle_in_transaction_session_timeout = 20000\; SELECT pg_advisory_xact_lock(:n)\; INSERT INTO t.operations (scope, operation, key, method, url, fingerprint, state, created_at, updated_at, status, identity, fixed_key, handle, lease_owner, lease_until) SELECT 'tenant-42', 'op-' || :n || '-' || :client_id, '0b3c9c1e-6f4a-4c39-8d6b-3d7c1b7a9f10', 'POST', 'https://api.test/cvms', 'sha256:abcdef0123456789', 'pending', 1733300000000, 1733300000000, NULL, NULL, false, NULL, 'host/123/abc', now() + 90000 * interval '1 millisecond' ON CONFLICT (scope, operation) DO NOTHING;
BEGIN\; SET LOCAL statement_timeout = 5000\; SET LOCAL lock_timeout = 5000\; SET LOCAL idle_in_transaction_session_timeout = 20000\; SET LOCAL synchronous_commit = off\; UPDATE t.operations SET state = 'succeeded', status = 201, identity = NULL, updated_at = 1733300000001, handle = NULL, lease_owner = NULL, lease_until = NULL WHERE scope = 'tenant-42' AND operation = 'op-' || :n || '-' || :client_id AND key IS NOT DISTINCT FROM '0b3c9c1e-6f4a-4c39-8d6b-3d7c1b7a9f10' AND created_at = 1733300000000;
COMMIT;
