"""Bench (issue 22): the conformance kit against popserver and against Debian's Dovecot, side by side.

    .venv/bin/python bench/conformance_dovecot.py [--out DIR] [--no-tls]

The kit (``python -m popserver.conformance``, as an operator would run it) goes through the same checks
against three servers, one after the other, each with a certificate from a throw-away CA (trustme) for STLS
on the POP3 port and implicit TLS on a second port:

- popserver's ``runpop3`` on the bench database (bench/common.py; DATABASE_URL, SQLite under data/ by
  default, which is wiped), with Django's default password hashers, the mail put in by ``manage.py deliver
  {user}``;
- Dovecot as Debian installs it (bench/dovecot.py: its own configuration, loopback, free ports, Maildir, a
  static passdb), the mail put in by ``dovecot-lda -c CONFIG -d {user}``;
- the same Dovecot with ``pop3_lock_session = yes``, the setting that gives RFC 1939's exclusive lock (off by
  default).

Each server gets two runs of the kit: everything over ``pop3://`` (``--json``), then ``pop3s://`` with
``--only tls.implicit`` for RFC 8314's implicit TLS. The script prints a Markdown table (every check, its
citation and level, the three results), then every check whose results differ, with each server's reason.
``--out DIR`` keeps the JSON reports and the kit's own summaries there (default: a new temporary directory).

Run as root (Dovecot is installed with apt-get if missing). Loopback only; each run of the kit is bounded
(``RUN_TIMEOUT``). Nothing here is needed by the tests.
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, Server, make_user, setup_django
from dovecot import Dovecot

from popserver.conformance.checks import CHECKS

USER = "conformance"
PASSWORD = "conformance-password"
RUN_TIMEOUT = 600  # seconds per run of the kit (popserver's 16 deliveries each start Django: about 40 s)
MARK = {"pass": "pass", "fail": "**FAIL**", "skip": "skip"}


def make_certificate(directory: Path) -> dict[str, str]:
    """A throw-away CA and a certificate for 127.0.0.1; the paths of the PEM files."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: str(directory / f"{name}.pem") for name in ("ca", "cert", "key", "chain")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_pem.write_to_path(paths["key"])
    for blob in cert.cert_chain_pems:
        blob.write_to_path(paths["cert"], append=True)
    cert.private_key_and_cert_chain_pem.write_to_path(paths["chain"])
    return paths


def run_kit(
    name: str,
    port: int,
    tls_port: int | None,
    deliver: list[str],
    env: dict[str, str],
    out: Path,
    cafile: str | None,
) -> dict:
    """The kit's JSON report for one server (plus the implicit-TLS run's result for tls.implicit)."""
    env = dict(env, POP3_CONFORMANCE_PASSWORD=PASSWORD)  # not on the command line
    tls = ["--cafile", cafile] if cafile else []
    report_path, log_path = out / f"{name}.json", out / f"{name}.txt"
    command = [
        sys.executable,
        "-m",
        "popserver.conformance",
        f"pop3://{USER}@127.0.0.1:{port}",
        "--i-understand-this-deletes-mail",
        "--deliver-command",
        shlex.join(deliver),
        "--json",
        str(report_path),
        *tls,
    ]
    started = time.monotonic()
    with open(log_path, "w") as log:
        result = subprocess.run(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT, check=False
        )
    if not report_path.exists():
        raise RuntimeError(f"the kit wrote no report for {name} (exit {result.returncode}); see {log_path}")
    report = json.loads(report_path.read_text())
    report["exit_status"] = result.returncode
    report["seconds"] = time.monotonic() - started
    if tls_port:
        implicit_path = out / f"{name}-pop3s.json"
        with open(out / f"{name}-pop3s.txt", "w") as log:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "popserver.conformance",
                    f"pop3s://{USER}@127.0.0.1:{tls_port}",
                    "--only",
                    "tls.implicit",
                    "--json",
                    str(implicit_path),
                    *tls,
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
        implicit = json.loads(implicit_path.read_text())
        found = next(c for c in implicit["checks"] if c["id"] == "tls.implicit")
        report["checks"] = [found if c["id"] == "tls.implicit" else c for c in report["checks"]]
    return report


def popserver_report(out: Path, certs: dict[str, str] | None) -> dict:
    env = setup_django()  # the default hashers (argon2 first), as installed
    make_user(USER, PASSWORD)
    from django.db import connection

    connection.close()
    args = ["--certfile", certs["chain"], "--tls-port", "0"] if certs else []
    deliver = [sys.executable, str(REPO / "manage.py"), "deliver", "{user}"]
    with open(out / "runpop3.log", "w") as log:
        server = Server(env, args=args, stderr=log)
        try:
            report = run_kit(
                "popserver", server.port, server.tls_port, deliver, env, out, certs and certs["ca"]
            )
        finally:
            server.stop()
    report["database"] = connection.vendor
    return report


def dovecot_report(name: str, out: Path, certs: dict[str, str] | None, lock: bool) -> dict:
    tls = (certs["cert"], certs["key"]) if certs else None
    with Dovecot(PASSWORD, tls=tls, pop3_lock_session=lock) as dovecot:
        report = run_kit(
            name,
            dovecot.pop3_port,
            dovecot.pop3s_port,
            dovecot.lda_command(),
            {},
            out,
            certs and certs["ca"],
        )
        report["version"] = dovecot.version
    return report


def results(report: dict) -> dict[str, dict]:
    return {c["id"]: c for c in report["checks"]}


def table(reports: dict[str, dict]) -> str:
    by_server = {name: results(report) for name, report in reports.items()}
    head = "| check | RFC section | level | " + " | ".join(reports) + " |"
    rows = [head, "|---|---|---|" + "---|" * len(reports)]
    for check in CHECKS:
        cells = [MARK.get(by_server[name][check.id]["status"], "?") for name in reports]
        rows.append(f"| `{check.id}` | {check.citation} | {check.level} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def differences(reports: dict[str, dict]) -> str:
    """The checks whose results differ, then those with the same result but different notes (behaviour the
    check allows either way), each with every server's reason and notes."""
    by_server = {name: results(report) for name, report in reports.items()}
    differ, same = [], []
    for check in CHECKS:
        found = {name: by_server[name][check.id] for name in reports}
        statuses = {r["status"] for r in found.values()}
        notes = {tuple(r.get("notes", [])) for r in found.values()}
        if len(statuses) == 1 and len(notes) == 1:
            continue
        lines = differ if len(statuses) > 1 else same
        lines.append(f"- `{check.id}` ({check.level}, {check.citation}): {check.title}")
        for name, result in found.items():
            why = "; ".join(x for x in [result.get("reason") or "", *result.get("notes", [])] if x)
            lines.append(f"  - {name}: {result['status']}" + (f": {why}" if why else ""))
    return "\n".join(
        ["Where the results differ:", "", *(differ or ["(nowhere)"])]
        + ["", "Same result, different notes:", "", *(same or ["(none)"])]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="directory for the JSON reports and logs (default: a temporary one)")
    parser.add_argument("--no-tls", action="store_true", help="no certificates: the TLS checks are skipped")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-conformance-"))
    out.mkdir(parents=True, exist_ok=True)
    certs = None if args.no_tls else make_certificate(out)

    reports = {"popserver": popserver_report(out, certs)}
    reports["Dovecot (default)"] = dovecot_report("dovecot", out, certs, lock=False)
    reports["Dovecot, pop3_lock_session=yes"] = dovecot_report("dovecot-lock", out, certs, lock=True)

    popserver, dovecot = reports["popserver"], reports["Dovecot (default)"]
    print(
        f"\nconformance kit {popserver['kit']['version']}; popserver on {popserver['database']} "
        f"(runpop3, manage.py deliver); Dovecot {dovecot['version']} (dovecot-pop3d, dovecot-lda, Maildir); "
        f"{'STLS and implicit TLS with a test CA' if certs else 'no TLS'}; {time.strftime('%Y-%m-%d')}\n"
    )
    for name, report in reports.items():
        summary = "; ".join(
            f"{level} {c['pass']}/{c['pass'] + c['fail']}" for level, c in report["summary"].items()
        )
        print(
            f"- {name}: exit {report['exit_status']}, {report['seconds']:.0f} s; {summary} passed"
            + (f"; error: {report['error']}" if report.get("error") else "")
        )
        print(f"  CAPA: {' | '.join(report['server']['capabilities'] or [])}")
    print()
    print(table(reports))
    print()
    print(differences(reports))
    print(f"\nReports and the kit's summaries: {out}")


if __name__ == "__main__":
    main()
