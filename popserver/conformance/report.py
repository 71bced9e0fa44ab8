"""The kit's reports: a terminal summary, JSON and Markdown."""

from __future__ import annotations

import json
import time

from popserver.conformance import __version__
from popserver.conformance.checks import LEVELS, SECTIONS
from popserver.conformance.runner import FAIL, PASS, SKIP, Report

MARK = {PASS: "pass", FAIL: "FAIL", SKIP: "skip"}


def _when(report: Report) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.started))


def verdict(report: Report) -> str:
    if report.error:
        return f"INCOMPLETE: {report.error}"
    if report.ok:
        return "PASS: every MUST passed"
    failed = sum(1 for r in report.results if r.status == FAIL and r.check.level == "MUST")
    return f"FAIL: {failed} MUST check{'s' if failed != 1 else ''} failed"


def summary_line(report: Report) -> str:
    counts = report.counts()
    parts = []
    for level in LEVELS:
        c = counts[level]
        ran = c[PASS] + c[FAIL]
        if ran or c[SKIP]:
            parts.append(f"{level} {c[PASS]}/{ran} passed" + (f" ({c[SKIP]} skipped)" if c[SKIP] else ""))
    return "; ".join(parts)


def terminal(report: Report, verbose: bool = False) -> str:
    """The summary for a terminal: every check by section, the reason under each failure."""
    out = [
        f"POP3 conformance kit {__version__}: {report.config.url}"
        + (" with STLS" if report.config.stls else ""),
        f"Delivery: {report.delivery}",
    ]
    if report.greeting:
        out.append(f"Greeting: {report.greeting}")
    if report.capabilities is not None:
        out.append(f"CAPA: {' | '.join(report.capabilities)}")
    for section, title in SECTIONS.items():
        results = [r for r in report.results if r.check.section == section]
        if not results:
            continue
        out.append("")
        out.append(title)
        for result in results:
            mark = MARK.get(result.status, result.status)
            out.append(f"  {mark:4}  {result.check.level:16}  {result.check.id:34} {result.check.title}")
            if result.status in (FAIL, SKIP) or (verbose and result.reason):
                out.append(f"        -> {result.reason}  [{result.check.citation}]")
            if verbose or result.status == FAIL:
                out.extend(f"           {note}" for note in result.notes)
    out.append("")
    out.append(f"Summary: {summary_line(report)}. {report.duration:.1f} s.")
    out.append(f"Result: {verdict(report)}")
    return "\n".join(out) + "\n"


def as_json(report: Report) -> str:
    counts = report.counts()
    data = {
        "kit": {"name": "popserver.conformance", "version": __version__},
        "server": {
            "url": report.config.url,
            "stls": report.config.stls,
            "greeting": report.greeting,
            "capabilities": report.capabilities,
            "capabilities_in_tls": report.tls_capabilities,
        },
        "delivery": report.delivery,
        "started": _when(report),
        "duration_seconds": round(report.duration, 3),
        "ok": report.ok,
        "error": report.error or None,
        "summary": {level: counts[level] for level in LEVELS},
        "checks": [r.as_dict() for r in report.results],
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def as_markdown(report: Report) -> str:
    out = [
        "# POP3 conformance report",
        "",
        f"- Server: `{report.config.url}`" + (" with STLS" if report.config.stls else ""),
        f"- Greeting: `{_cell(report.greeting)}`" if report.greeting else "- Greeting: (none)",
        f"- CAPA: {', '.join(f'`{c}`' for c in report.capabilities)}"
        if report.capabilities is not None
        else "- CAPA: not supported",
        f"- Delivery: {_cell(report.delivery)}",
        f"- Kit: popserver.conformance {__version__}, {_when(report)}, {report.duration:.1f} s",
        f"- Summary: {summary_line(report)}",
        f"- **Result: {verdict(report)}**",
    ]
    for section, title in SECTIONS.items():
        results = [r for r in report.results if r.check.section == section]
        if not results:
            continue
        out += [
            "",
            f"## {title}",
            "",
            "| Result | Level | Check | What | Citation | Reason |",
            "|---|---|---|---|---|---|",
        ]
        for r in results:
            reason = "; ".join([r.reason, *r.notes]) if r.reason else "; ".join(r.notes)
            mark = {PASS: "pass", FAIL: "**FAIL**", SKIP: "skip"}.get(r.status, r.status)
            out.append(
                f"| {mark} | {r.check.level} | `{r.check.id}` | {_cell(r.check.title)} | {r.check.citation} "
                f"| {_cell(reason)} |"
            )
    return "\n".join(out) + "\n"
