#!/usr/bin/env bash
# One command to run the tests: on SQLite, then on PostgreSQL (127.0.0.1:5432) and, for the database-heavy
# tests, on MariaDB (127.0.0.1:3306, root without password) when they answer. With POPSERVER_REQUIRE_POSTGRES=1 / POPSERVER_REQUIRE_MARIADB=1 (CI)
# a server that does not answer is a failure; otherwise that run is skipped with a one-line reason.
# Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
PG_URL="${POPSERVER_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/popserver}"
MARIADB_URL="${POPSERVER_TEST_MARIADB_URL:-mysql://root@127.0.0.1:3306/popserver}"
status=0
export POPSERVER_SKIP_LOG="$PWD/data/test-skips.txt"
mkdir -p data && : > "$POPSERVER_SKIP_LOG"

echo "== lint: ruff check, ruff format --check, lint-imports (the package layering)"
.venv/bin/ruff check --quiet . || status=1
.venv/bin/ruff format --check --quiet . || status=1
.venv/bin/lint-imports --no-cache >/dev/null 2>&1 || { .venv/bin/lint-imports --no-cache; status=1; }

echo "== tests on SQLite"
DATABASE_URL="sqlite:///$PWD/data/test-default.sqlite3" .venv/bin/pytest "$@" || status=1

if .venv/bin/python scripts/db_answers.py "$PG_URL"; then
    echo "== tests on PostgreSQL"
    DATABASE_URL="$PG_URL" .venv/bin/pytest "$@" || status=1
elif [ "${POPSERVER_REQUIRE_POSTGRES:-0}" = 1 ]; then
    echo "PostgreSQL does not answer at $PG_URL and POPSERVER_REQUIRE_POSTGRES=1" >&2
    status=1
else
    echo "== skipping the PostgreSQL run: no server answers at $PG_URL"
fi
# Existing sites run on MariaDB too: the delivery, lock and QUIT tests run there as well.
MARIADB_TESTS=(tests/test_compiled.py tests/test_session_threads.py tests/test_login_at_once.py tests/test_maildrop_orm.py tests/test_delivery.py tests/test_deliver_command.py tests/test_auth.py tests/test_server_live.py
               tests/test_deliver_options.py tests/test_quota.py tests/test_importmail.py tests/test_exportmail.py
               tests/test_mail_backend.py tests/test_retention.py tests/test_quota_warnings.py
               tests/test_overview.py tests/test_lmtp_live.py tests/test_lmtp_postfix.py tests/test_lmtp_exim.py
               tests/test_stored_bodies.py
               tests/test_stored_bodies_crash.py tests/test_overload.py tests/test_workers.py)
# Arguments that name test files replace that list; others (-k, -x...) filter it.
for arg in "$@"; do
    if [ -e "${arg%%::*}" ]; then MARIADB_TESTS=(); break; fi
done
if .venv/bin/python scripts/db_answers.py "$MARIADB_URL"; then
    echo "== tests on MariaDB"
    DATABASE_URL="$MARIADB_URL" .venv/bin/pytest "${MARIADB_TESTS[@]}" "$@" || status=1
elif [ "${POPSERVER_REQUIRE_MARIADB:-0}" = 1 ]; then
    echo "MariaDB does not answer at $MARIADB_URL and POPSERVER_REQUIRE_MARIADB=1" >&2
    status=1
else
    echo "== skipping the MariaDB run: no server answers at $MARIADB_URL"
fi
# Skips are not passes: say which tests did not run, and why, where nobody can miss it.
if [ -s "$POPSERVER_SKIP_LOG" ]; then
    echo "== skipped (not passed): $(wc -l < "$POPSERVER_SKIP_LOG") test runs"
    cut -f1,3 "$POPSERVER_SKIP_LOG" | sort | uniq -c | sed 's/^ */   /'
fi
exit $status
