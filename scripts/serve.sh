#!/usr/bin/env bash
# One command from a fresh clone to a running POP3 server on SQLite:
# venv, install, migrate, a demo mailbox (demo / demo-password) with a sample message, then runpop3.
# Extra arguments go to runpop3 (e.g. 0.0.0.0:8110).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python manage.py migrate --no-input -v 0
.venv/bin/python manage.py shell -v 0 -c "from project.demo import ensure_demo_mailbox; ensure_demo_mailbox()"
echo "Demo mailbox: user 'demo', password 'demo-password'. Try: curl -s pop3://demo:demo-password@127.0.0.1:8110/1"
exec .venv/bin/python manage.py runpop3 "$@"
