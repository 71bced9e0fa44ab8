"""The POP3 conformance kit (``popserver.conformance``).

- Every check can fail: the kit runs against ``tests/toy_pop3.py``, a small POP3 server with switchable
  faults, once per fault, and the checks that fault breaks must fail.
- The same toy without faults passes every check (so the checks are not simply strict).
- The kit runs with only the standard library (Django unimportable), delivers by LMTP, SMTP and a command,
  and writes its JSON and Markdown reports.
- Against popserver's own ``runpop3``, with delivery through ``manage.py deliver``, every MUST and SHOULD
  passes.
"""

from __future__ import annotations

import ast
import json
import ssl
import subprocess
import sys

import pytest

from popserver.conformance import checks as registry
from popserver.conformance.cli import main, parse_url, run
from popserver.conformance.client import unstuff
from popserver.conformance.corpus import (
    BOUNDARY_NAME,
    CORPUS_DIR,
    boundary_message,
    boundary_targets,
    expected_top,
    load,
    presented,
    smtp_form,
)
from popserver.conformance.delivery import CommandDeliverer, Deliverer, DeliveryError
from popserver.conformance.runner import FAIL, PASS, SKIP, Config
from tests.conftest import CORPUS_SIZES, REPO, corpus_files, manage_py_command, subprocess_env
from tests.toy_pop3 import FAULTS, ToyServer


class ToyDeliverer(Deliverer):
    """Straight into the toy's store, as an MDA would (the bytes as given)."""

    name = "toy"

    def __init__(self, toy: ToyServer):
        self.toy = toy

    def deliver(self, message: bytes) -> None:
        self.toy.store.deliver(message)


@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture(scope="module")
def cafile(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server_tls(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def toy(server_tls):
    """toy(*faults, tls=True) -> a started ToyServer, stopped at teardown."""
    started: list[ToyServer] = []

    def start(*faults: str, tls: bool = True) -> ToyServer:
        started.append(ToyServer(faults, tls=server_tls if tls else None))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def kit(server: ToyServer, cafile: str, *, implicit: bool = False, deliver: bool = True, **options):
    config = Config(
        host="127.0.0.1",
        port=server.tls_port if implicit else server.port,
        user=server.user,
        password=options.pop("password", server.password),
        implicit_tls=implicit,
        cafile=cafile,
        timeout=options.pop("timeout", 5.0),
        lock_wait=options.pop("lock_wait", 2.0),
        delivery_timeout=5.0,
        **options,
    )
    return run(config, ToyDeliverer(server) if deliver else None, say=lambda text: None)


def failures(report) -> dict[str, str]:
    return {r.check.id: r.reason for r in report.results if r.status == FAIL}


# Each fault, the checks it must fail, and the kit's selection (None: all; a timeout for faults that leave
# the kit waiting).
FAULT_CASES = {
    "greeting_err": (["rfc1939.greeting"], "rfc1939.greeting", {}),
    "lowercase_ok": (["rfc1939.noop", "rfc1939.status-indicators"], "rfc1939", {}),
    "any_password": (["rfc1939.wrong-password"], "rfc1939.wrong-password", {}),
    "quit_auth_silent": (["rfc1939.quit-authorization"], "rfc1939.quit-authorization", {}),
    "stat_before_login": (["rfc1939.wrong-state"], "rfc1939.wrong-state", {}),
    "case_sensitive": (["rfc1939.case-insensitive"], "rfc1939.case-insensitive", {}),
    "stat_wrong_octets": (["rfc1939.stat"], "rfc1939.stat", {}),
    "list_zero_based": (["rfc1939.list"], "rfc1939.list", {}),
    "lax_numbers": (["rfc1939.bad-message-number"], "rfc1939.bad-message-number", {}),
    "noop_err": (["rfc1939.noop"], "rfc1939.noop", {}),
    "unknown_closes": (["rfc1939.unknown-command"], "rfc1939.unknown-command", {}),
    "deleted_accessible": (["rfc1939.dele-marks"], "rfc1939.dele-marks", {}),
    "renumber": (["rfc1939.dele-marks"], "rfc1939.dele-marks", {}),
    "immediate_dele": (["rfc1939.dele-drop-keeps", "rfc1939.rset"], "rfc1939.dele-*,rfc1939.rset", {}),
    "quit_keeps": (["rfc1939.quit-deletes"], "rfc1939.quit-deletes", {}),
    "no_rset": (["rfc1939.rset"], "rfc1939.rset", {}),
    "no_lock": (["rfc1939.lock-exclusive"], "rfc1939.lock-*", {}),
    "lock_breaks_holder": (["rfc1939.lock-holder-unaffected"], "rfc1939.lock-holder-unaffected", {}),
    "lock_kept_after_quit": (["rfc1939.lock-released-quit"], "rfc1939.lock-released-quit", {}),
    "lock_kept_on_drop": (["rfc1939.lock-released-drop"], "rfc1939.lock-released-drop", {"lock_wait": 0.5}),
    "lock_no_code": (["rfc2449.in-use"], "rfc2449.in-use", {}),
    "live_view": (["rfc1939.snapshot"], "rfc1939.snapshot", {}),
    "autologout_fast": (["rfc1939.autologout"], "rfc1939.autologout", {"autologout_wait": 1.0}),
    "wrong_sizes": (["corpus.list-sizes"], "corpus.list-sizes", {}),
    "raw_lf": (["corpus.bare-lf", "corpus.lone-cr"], "corpus", {}),
    "no_stuffing": (["corpus.dot-stuffing", "corpus.top-stuffing"], "corpus", {}),
    "top_no_stuffing": (["corpus.top-stuffing"], "corpus.top-*", {}),
    "chunked_stuffing": (["corpus.buffer-boundaries"], "corpus.buffer-boundaries", {}),
    "no_final_crlf": (["corpus.unterminated-last-line"], "corpus", {"timeout": 1.0}),
    "strip_8bit": (["corpus.8bit"], "corpus.8bit", {}),
    "nul_truncate": (["corpus.nul"], "corpus.nul", {}),
    "wrap_long_lines": (["corpus.long-line"], "corpus.long-line", {}),
    "lone_cr_to_crlf": (["corpus.lone-cr"], "corpus.lone-cr", {}),
    "add_blank_line": (["corpus.retr"], "corpus.retr", {}),
    "top_ignores_lines": (["corpus.top-lines"], "corpus.top-lines", {}),
    "top_no_blank": (["corpus.top-headers"], "corpus.top-headers", {}),
    "uidl_long": (["uidl.syntax"], "uidl", {}),
    "uidl_dup": (["uidl.unique"], "uidl.unique", {}),
    "uidl_unstable": (["uidl.stable"], "uidl", {}),
    "uidl_single_mismatch": (["uidl.single"], "uidl.single", {}),
    "uidl_shows_deleted": (["uidl.deleted-hidden"], "uidl.deleted-hidden", {}),
    "uidl_reuse": (["uidl.not-reused", "uidl.stable"], "uidl", {}),
    "no_capa": (["rfc2449.capa"], "rfc2449", {}),
    "capa_auth_only": (["rfc2449.capa-transaction"], "rfc2449.capa-transaction", {}),
    "capa_bad": (["rfc2449.capa-syntax"], "rfc2449.capa-syntax", {}),
    "capa_lies": (["rfc2449.capa-honest"], "rfc2449.capa-honest", {}),
    "short_lines": (["rfc2449.command-length"], "rfc2449.command-length", {}),
    "long_greeting": (["rfc2449.response-length"], "rfc2449.response-length", {}),
    "bad_resp_code": (["rfc2449.resp-codes"], "rfc2449.resp-codes,rfc1939.unknown-command", {}),
    "no_auth_code": (["rfc2449.auth-code"], "rfc2449.auth-code", {}),
    "no_pipelining": (["rfc2449.pipelining"], "rfc2449.pipelining", {"timeout": 1.0}),
    "implicit_plain": (["tls.implicit"], "tls", {"implicit": True, "timeout": 2.0}),
    "stls_refused": (["tls.stls"], "tls", {}),
    "stls_still_announced": (["tls.capa-after-stls"], "tls", {}),
    "stls_twice": (["tls.stls-once"], "tls", {}),
    "stls_injection": (["tls.stls-injection"], "tls", {}),
    "stls_injection_plaintext": (["tls.stls-injection"], "tls", {}),
    "stls_after_login": (["tls.stls-transaction"], "tls.stls-transaction", {}),
    "sasl_ignores_ir": (["sasl.plain"], "sasl", {}),
    "sasl_no_continuation": (["sasl.plain-continuation"], "sasl", {}),
    "sasl_cancel_continues": (["sasl.cancel"], "sasl", {}),
    "sasl_b64_lenient": (["sasl.bad-base64"], "sasl", {}),
    "sasl_unknown_ok": (["sasl.unknown-mechanism"], "sasl", {}),
    "sasl_after_login": (["sasl.after-login"], "sasl.after-login", {}),
    "sasl_login_broken": (["sasl.login"], "sasl", {}),
    "auth_no_list": (["sasl.list-mechanisms"], "sasl", {}),
    "utf8_refused": (["utf8.command"], "utf8", {}),
    "utf8_after_login": (["utf8.after-login"], "utf8", {}),
    "utf8_mangles": (["utf8.retr"], "utf8", {}),
    "empty_line_closes": (["robustness.empty-line"], "robustness", {}),
    "garbage_silent": (["robustness.garbage"], "robustness", {"timeout": 1.0}),
    "overlong_crash": (["robustness.overlong-line", "robustness.server-alive"], "robustness", {}),
    "lf_only_refused": (["robustness.lf-only"], "robustness", {}),
}
# Checks proved able to fail by a test of their own below.
FAILED_ELSEWHERE = {"rfc1939.login": "test_wrong_credentials_stop_the_run"}


def test_every_check_is_made_by_a_probe_or_the_setup():
    from popserver.conformance.probes import PROBES, SETUP_IDS

    made = {check_id for probe in PROBES for check_id in probe.ids} | set(SETUP_IDS)
    assert made == {c.id for c in registry.CHECKS}


def test_every_fault_has_a_case_and_every_check_can_fail():
    assert set(FAULT_CASES) == set(FAULTS)
    covered = {check for expected, _, _ in FAULT_CASES.values() for check in expected} | set(FAILED_ELSEWHERE)
    assert covered == {c.id for c in registry.CHECKS}


@pytest.mark.parametrize("fault", sorted(FAULT_CASES))
def test_each_check_fails_against_its_fault(toy, cafile, fault):
    expected, only, options = FAULT_CASES[fault]
    report = kit(toy(fault), cafile, only=only.split(","), **dict(options))
    failed = failures(report)
    assert set(expected) <= set(failed), f"{fault}: failed {failed}; expected {expected} among them"
    for check_id in expected:
        assert failed[check_id], f"{check_id} failed without a reason"
    must_failed = any(registry.BY_ID[c].level == registry.MUST for c in expected)
    assert report.ok is not must_failed or bool(report.error)


def test_the_correct_toy_passes_every_check(toy, cafile):
    server = toy()
    report = kit(server, cafile)
    assert failures(report) == {}
    assert not report.error
    skipped = {r.check.id: r.reason for r in report.results if r.status == SKIP}
    assert set(skipped) == {"tls.implicit", "rfc1939.autologout"}, skipped
    assert report.ok
    # The kit cleans up after itself.
    assert server.store.messages == []


def test_the_correct_toy_passes_over_implicit_tls_with_stls_and_auth_plain(toy, cafile):
    server = toy()
    report = kit(server, cafile, implicit=True, auth="plain", only=["tls", "rfc1939", "sasl"])
    assert failures(report) == {}
    assert report.result("tls.implicit").status == PASS
    report = kit(server, cafile, stls=True, only=["corpus", "tls"])
    assert failures(report) == {}
    assert report.result("tls.stls").status == PASS


def test_a_handshake_refused_after_plaintext_pipelined_behind_stls_is_safe(toy, cafile):
    """RFC 2595 s.4 starts the TLS negotiation right after STLS's CRLF: a server that takes the plaintext
    behind it as TLS data and fails the handshake (Dovecot) runs nothing, so the check passes, with a note;
    answering the injected command in plaintext fails it."""
    report = kit(toy("stls_pipelined_as_tls"), cafile, only=["tls"])
    result = report.result("tls.stls-injection")
    assert result.status == PASS and "the injected command did not run" in result.notes[0], result.notes
    assert report.result("tls.stls").status == PASS  # an STLS without pipelined plaintext still works
    report = kit(toy("stls_injection_plaintext"), cafile, only=["tls"])
    assert "answered in plaintext" in failures(report)["tls.stls-injection"]


def test_wrong_credentials_stop_the_run(toy, cafile):
    report = kit(toy(), cafile, password="wrong")
    assert report.result("rfc1939.login").status == FAIL
    assert "check the user and password" in report.error
    assert not report.ok
    assert report.result("corpus.retr").status == SKIP


def test_an_autologout_wait_that_the_server_survives_passes(toy, cafile):
    report = kit(toy(), cafile, only=["rfc1939.autologout"], autologout_wait=0.5)
    assert report.result("rfc1939.autologout").status == PASS
    assert "less than the 10 minutes" in report.result("rfc1939.autologout").notes[0]


def test_a_probe_that_cannot_follow_the_server_fails_its_checks_and_the_run_goes_on(toy, cafile, monkeypatch):
    from popserver.conformance import probes

    lock_probe = next(p for p in probes.PROBES if p.name == "probe_lock")
    held = []

    def confused(ctx):
        held.append(ctx.session())  # holds the lock when it gives up
        raise KeyError("no such field")

    monkeypatch.setattr(lock_probe, "function", confused)
    report = kit(toy(), cafile, only=["rfc1939.lock-*", "robustness.server-alive"])
    reason = report.result("rfc1939.lock-exclusive").reason
    assert report.result("rfc1939.lock-exclusive").status == FAIL and "KeyError" in reason, reason
    assert held[0].closed  # dropped by the kit, so the next probe could log in
    assert report.result("robustness.server-alive").status == PASS
    assert report.result("rfc1939.lock-released-drop").status == PASS


def test_without_a_delivery_method_only_mail_free_checks_run(toy, cafile):
    server = toy()
    server.store.deliver(b"Subject: keep me\r\n\r\nbody\r\n")
    report = kit(server, cafile, deliver=False)
    assert failures(report) == {}
    assert report.result("tls.stls").status == PASS
    assert report.result("corpus.retr").status == SKIP
    assert "needs mail" in report.result("corpus.retr").reason
    assert len(server.store.messages) == 1  # nothing was deleted


# The command line --------------------------------------------------------------------------------------------
def test_refuses_to_delete_mail_without_consent(toy, capsys):
    server = toy(tls=False)
    with pytest.raises(SystemExit) as exit_info:
        main([f"pop3://toy:toy-secret@127.0.0.1:{server.port}", "--lmtp", f"127.0.0.1:{server.lmtp_port}"])
    assert exit_info.value.code == 2
    assert "--i-understand-this-deletes-mail" in capsys.readouterr().err
    assert server.sessions == 0


def test_lmtp_delivery_json_and_markdown_reports_and_exit_status(toy, tmp_path, capsys):
    server = toy("quit_keeps", tls=False)
    json_path, md_path = tmp_path / "report.json", tmp_path / "report.md"
    argv = [
        f"pop3://toy:toy-secret@127.0.0.1:{server.port}",
        "--i-understand-this-deletes-mail",
        "--lmtp",
        f"127.0.0.1:{server.lmtp_port}",
        "--only",
        "rfc1939,corpus",
        "--json",
        str(json_path),
        "--markdown",
        str(md_path),
        "--timeout",
        "5",
    ]
    assert main(argv) == 1  # QUIT deletes nothing: a MUST fails
    out = capsys.readouterr()
    assert "FAIL  MUST" in out.out and "rfc1939.quit-deletes" in out.out
    assert "Emptying the mailbox first" in out.err
    data = json.loads(json_path.read_text())
    assert data["ok"] is False and data["delivery"].startswith("LMTP to 127.0.0.1:")
    by_id = {c["id"]: c for c in data["checks"]}
    assert by_id["rfc1939.quit-deletes"]["status"] == "fail"
    assert by_id["rfc1939.quit-deletes"]["citation"] == "RFC 1939 s.6"
    assert by_id["corpus.retr"]["status"] == "pass"
    assert "in transit" in " ".join(by_id["corpus.unterminated-last-line"]["notes"])
    assert "toy-secret" not in json_path.read_text() + md_path.read_text() + out.out + out.err
    markdown = md_path.read_text()
    assert "| **FAIL** | MUST | `rfc1939.quit-deletes` |" in markdown
    assert "## RFC 1939 s.3, s.5, s.7, s.11: message bytes (the corpus)" in markdown


def test_smtp_delivery_and_a_json_report_on_stdout(toy, capsys):
    server = toy(tls=False)
    argv = [
        f"pop3://toy:toy-secret@127.0.0.1:{server.port}",
        "--i-understand-this-deletes-mail",
        "--smtp",
        f"127.0.0.1:{server.smtp_port}",
        "--only",
        "corpus",
        "--json",
        "-",
        "--trace",
    ]
    assert main(argv) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)  # the summary went to stderr
    assert data["ok"] is True and data["summary"]["MUST"]["fail"] == 0
    assert data["delivery"].startswith("SMTP to ")
    assert "Result: PASS" in out.err
    assert "C: PASS ***" in out.err and "toy-secret" not in out.err  # the trace masks the password


def test_command_delivery_feeds_each_message_on_stdin_and_reports_failures(tmp_path):
    command = CommandDeliverer(f"{sys.executable} -c 'import sys; sys.exit(75)' {{user}}", "toy", "toy")
    assert command.argv[-1] == "toy"
    with pytest.raises(DeliveryError, match="exited 75"):
        command.deliver(b"Subject: x\r\n\r\n")
    with pytest.raises(DeliveryError, match="not found"):
        CommandDeliverer("/nonexistent/mda {user}", "toy", "toy").deliver(b"x")
    # An MDA that writes each message it is given into a folder: the bytes arrive as they are.
    script = tmp_path / "mda.py"
    script.write_text(
        "import sys, pathlib\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "(out / f'{len(list(out.iterdir())):03d}-{sys.argv[2]}').write_bytes(sys.stdin.buffer.read())\n"
    )
    folder = tmp_path / "out"
    folder.mkdir()
    mda = CommandDeliverer(f"{sys.executable} {script} {folder} {{user}}", "alice", "alice@example.com")
    corpus = load()
    for message in corpus:
        mda.deliver(message.raw)
    written = sorted(folder.iterdir())
    assert [p.read_bytes() for p in written] == [m.raw for m in corpus]
    assert all(p.name.endswith("-alice") for p in written)


def test_parse_url_and_the_password_from_the_environment(toy, monkeypatch, capsys):
    assert parse_url("pop3://us%40er:p%3Ass@[::1]:1100") == ("::1", 1100, "us@er", "p:ss", False)
    assert parse_url("pop3s://bob:x@mail.example") == ("mail.example", 995, "bob", "x", True)
    assert parse_url("pop3://bob@mail.example")[3] is None
    with pytest.raises(ValueError):
        parse_url("imap://bob:x@mail.example")
    server = toy(tls=False)
    monkeypatch.setenv("POP3_CONFORMANCE_PASSWORD", server.password)
    assert main([f"pop3://toy@127.0.0.1:{server.port}", "--only", "rfc2449.capa*,robustness"]) == 0
    assert "Result: PASS" in capsys.readouterr().out


def test_list_checks_and_unknown_selections(capsys):
    assert main(["--list-checks"]) == 0
    listing = capsys.readouterr().out
    assert all(check.id in listing and check.citation in listing for check in registry.CHECKS)
    with pytest.raises(SystemExit):
        main(["pop3://a:b@127.0.0.1:1", "--only", "rfc9999"])
    assert "no such checks" in capsys.readouterr().err


def test_the_kit_runs_with_the_standard_library_only(toy, tmp_path):
    """Isolated mode (-I) without site-packages (-S): Django cannot be imported; the kit still runs, over
    LMTP, and loads nothing of popserver but itself."""
    server = toy(tls=False)
    report_path = tmp_path / "report.json"
    bootstrap = (
        "import importlib.util, runpy, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "assert importlib.util.find_spec('django') is None, 'django is importable'\n"
        "sys.argv = ['popserver.conformance'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('popserver.conformance', run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        "    mods = sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'popserver'))\n"
        "    print('MODULES', mods, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            bootstrap,
            f"pop3://toy:toy-secret@127.0.0.1:{server.port}",
            "--i-understand-this-deletes-mail",
            "--lmtp",
            f"127.0.0.1:{server.lmtp_port}",
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    modules = ast.literal_eval(result.stderr.split("MODULES", 1)[1].strip())
    assert modules and all(m == "popserver" or m.startswith("popserver.conformance") for m in modules), (
        modules
    )
    data = json.loads(report_path.read_text())
    assert data["ok"] and data["summary"]["MUST"]["fail"] == 0


# Building blocks ----------------------------------------------------------------------------------------
def test_the_kits_corpus_is_the_shared_corpus_and_package_data():
    shipped = sorted(p.name for p in CORPUS_DIR.glob("*.eml"))
    assert shipped == sorted(CORPUS_SIZES)
    assert {p.name: p.read_bytes() for p in corpus_files()} == {
        name: (CORPUS_DIR / name).read_bytes() for name in shipped
    }
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"conformance/corpus/*"' in pyproject
    files, generated = load()[:-1], load()[-1]
    assert generated.name == BOUNDARY_NAME
    for message in files:
        on_disk, list_size = CORPUS_SIZES[message.name]
        assert len(message.raw) == on_disk
        # What RETR sends, less the CRLF added to an unterminated last line, is the README's LIST size.
        expected = message.expected()
        assert len(expected) - (2 if message.unterminated else 0) == list_size


def test_the_generated_message_puts_the_hard_cases_on_buffer_boundaries():
    message = boundary_message()
    assert message.endswith(b"\r\nend\r\n") and b"\n" not in message.replace(b"\r\n", b"")
    targets = boundary_targets()
    assert len(targets) == 25 and len({t for t, _ in targets}) == 25
    for size in (1024, 4096, 8192, 65536):  # these buffer sizes meet all three variants
        assert {v for t, v in targets if t % size == 0 and (t // size) % 2 == 1} == {0, 1, 2}
    for target, variant in targets:
        if variant == 0:  # a lone '.' line starts at the boundary
            assert message[target - 2 : target + 3] == b"\r\n.\r\n"
        elif variant == 1:  # CR before it, LF after it, then a '.' line
            assert message[target - 1 : target + 2] == b"\r\n."
        else:  # a '..' line starts just before it
            assert message[target - 3 : target + 1] == b"\r\n.."


def test_unstuff_and_expected_top():
    assert unstuff(b"..\r\n.x\r\nmiddle . dot\r\n...three\r\n") == b".\r\nx\r\nmiddle . dot\r\n..three\r\n"
    content = presented(b"A: 1\nB: 2\n\nl1\nl2\nl3")
    assert expected_top(content, 0) == b"A: 1\r\nB: 2\r\n\r\n"
    assert expected_top(content, 2) == b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n"
    assert expected_top(content, 9) == content
    assert expected_top(b"A: 1\r\nB: 2\r\n", 0) == b"A: 1\r\nB: 2\r\n"  # headers only
    # Over SMTP and LMTP the envelope is MAIL FROM: the mbox From line is not sent; every line ends in CRLF.
    from_line = next(m for m in load() if m.short == "12")
    assert smtp_form(from_line.raw) == from_line.expected() and not smtp_form(from_line.raw).startswith(
        b"From "
    )


# Against popserver ------------------------------------------------------------------------------------------
@pytest.mark.live
@pytest.mark.slow
@pytest.mark.timeout(300)  # 16 deliveries, each a manage.py process: about 35 s here, more on a busy machine
def test_popserver_passes_every_must_and_should(runpop3, make_mailbox, tmp_path, ca, cafile):
    """``runpop3`` with STLS and implicit TLS; the kit as a subprocess delivering through ``manage.py
    deliver``. Every MUST and SHOULD passes (the Dovecot-practice checks too)."""
    from popserver.models import Message

    cert = ca.issue_cert("localhost", "127.0.0.1")
    pem = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    mailbox = make_mailbox("alice", "secret", email="alice@example.com")
    server = runpop3("--certfile", str(pem), "--tls-port", "0")
    deliver = " ".join(manage_py_command("deliver", "{user}"))
    env = subprocess_env()
    kit_command = [sys.executable, "-m", "popserver.conformance", "--cafile", cafile, "--json", "-"]
    result = subprocess.run(
        [
            *kit_command,
            f"pop3://alice:secret@127.0.0.1:{server.port}",
            "--i-understand-this-deletes-mail",
            "--deliver-command",
            deliver,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    data = json.loads(result.stdout)
    not_passed = {c["id"]: (c["status"], c["reason"]) for c in data["checks"] if c["status"] != "pass"}
    assert not_passed == {
        "tls.implicit": ("skip", "no pop3s:// URL given"),
        "rfc1939.autologout": ("skip", "not tried: give --autologout-wait 600 (ten minutes)"),
    }, result.stderr
    assert "UTF8 USER" in data["server"]["capabilities"]  # so the RFC 6856 checks ran, and passed
    assert result.returncode == 0 and data["ok"]
    assert "Emptying the mailbox first: deleted 0 messages" in result.stderr
    assert not Message.objects.filter(mailbox=mailbox).exists()  # the kit cleaned up

    # Implicit TLS (RFC 8314), and everything that needs no mail: nothing to deliver, nothing deleted.
    result = subprocess.run(
        [*kit_command, f"pop3s://alice:secret@127.0.0.1:{server.tls_port}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    data = json.loads(result.stdout)
    statuses = {c["id"]: c["status"] for c in data["checks"]}
    assert statuses["tls.implicit"] == "pass" and statuses["sasl.plain"] == "pass"
    assert "fail" not in statuses.values() and result.returncode == 0, result.stderr
