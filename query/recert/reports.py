"""Recertification reports as CSV, JSON, HTML and PDF, each signed by the server key and verifiable offline.

Every format carries the same compact JWS, signed with the server's Ed25519 key, whose payload is the whole
report as canonical JSON (RFC 8785). The visible content is rendered from that payload deterministically, so
``verify_report`` can (1) check the signature, which proves the embedded copy is the one the server signed, then
(2) render the signed copy again in the file's format and compare it with the file, naming every difference:
``agents[3].recommendation: signed 'revoke', file has 'keep'`` (JSON), ``row support-agent, column
recommendation`` (CSV), the changed lines (HTML) or the changed text on a page (PDF).

Where the signature sits: JSON ``{"report": ..., "signature": JWS}``; CSV a last line ``# signature: JWS``; HTML a
``<script type="application/jose" id="custody-signature">``; PDF an embedded file ``custody-report.jws``.
"""

from __future__ import annotations

import csv
import difflib
import html
import io
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm

from query.index.aggregates import LakeAggregates
from query.recert.review import Review
from query.recert.rows import CSV_COLUMNS, cells
from query.spreadsheet import csv_cell
from store.ground.canonical import canonicalize
from store.ground.errors import InvalidInput
from store.ground.jws import JwsError, parse_compact, sign_compact, verify_signature
from store.ground.layout import DataDir
from store.ground.server_key import ServerKey
from store.merkle_log import log_origin, newest_history_record

__all__ = [
    "FORMATS",
    "MEDIA_TYPES",
    "SignedReport",
    "Verification",
    "build_report",
    "render",
    "report_body",
    "report_filename",
    "sign_report",
    "signed_review",
    "verify_report",
]

FORMATS = ("csv", "json", "html", "pdf")
SCHEMA = "custody-recert/1"
_JWS = re.compile(rb"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


MEDIA_TYPES = {"csv": "text/csv", "json": "application/json", "html": "text/html", "pdf": "application/pdf"}


@dataclass(frozen=True)
class SignedReport:
    review: Review
    form: str
    content: bytes

    @property
    def filename(self) -> str:
        return report_filename(self.review, self.form)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.form]


def report_filename(review: Review, form: str) -> str:
    return f"recert-{review.tenant}-{review.generated_at[:10]}.{form}"


def build_report(data_dir: Path, tenant: str, *, window_days: int, form: str) -> SignedReport:
    """Review the tenant's agents over the window and render the signed report (what the CLI, the read API and
    the dashboard all call)."""
    if form not in FORMATS:
        raise InvalidInput(f"format must be one of {', '.join(FORMATS)}, got {form!r}")
    review, body, jws = signed_review(data_dir, tenant, window_days=window_days)
    return SignedReport(review, form, render(body, jws, form))


def signed_review(
    data_dir: Path, tenant: str, *, window_days: int, facts: LakeAggregates | None = None
) -> tuple[Review, dict[str, Any], str]:
    """The review, its report body and the JWS over it, ready to render in any format (``facts``: as for
    ``access_review``)."""
    from query.recert.review import access_review

    layout = DataDir.existing(data_dir)
    server_key = ServerKey(layout.server_key())
    checkpoint = newest_checkpoint(layout)  # before the review reads the lake: every event it covers is in the tree
    review = access_review(data_dir, tenant, window_days=window_days, facts=facts)
    body = report_body(review, server_key, checkpoint)
    return review, body, sign_report(body, server_key)


def newest_checkpoint(layout: DataDir) -> dict[str, Any] | None:
    """The transparency log's newest checkpoint (origin, size, root): where an auditor checks the report's log."""
    record = newest_history_record(layout.checkpoint_history)
    if record is None:
        return None
    return {"origin": log_origin(layout.server_key()), "size": record["size"], "root": record["root"]}


def report_body(review: Review, server_key: ServerKey, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    body = asdict(review)
    return {
        "schema": SCHEMA,
        "title": f"Access recertification of the agents of tenant {review.tenant}",
        "signed_by": {"kid": server_key.kid, "jwk": server_key.jwk},
        "log_position": {
            "events": body.pop("events"),
            "heads": body.pop("heads"),
            "checkpoint": checkpoint,
            "findings": body.pop("findings_from"),
        },
        "summary": review.summary(),
        **body,
    }


def sign_report(body: dict[str, Any], server_key: ServerKey) -> str:
    return sign_compact(canonicalize(body), server_key.private_key, server_key.kid)


def render(body: dict[str, Any], jws: str, form: str) -> bytes:
    if form == "json":
        return orjson.dumps({"report": body, "signature": jws}, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    if form == "csv":
        return _csv(body, jws).encode()
    if form == "html":
        return _html(body, jws).encode()
    if form == "pdf":
        from query.recert.pdf import render_pdf

        return render_pdf(body, jws)
    raise InvalidInput(f"format must be one of {', '.join(FORMATS)}, got {form!r}")


@dataclass
class Verification:
    form: str
    signature_ok: bool
    kid: str | None
    key_source: str
    differences: list[str] = field(default_factory=list)
    body: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.signature_ok and not self.differences


def verify_report(path: Path, *, public_key: Ed25519PublicKey | None = None) -> Verification:
    """Check a report file offline. Without ``public_key`` the key embedded in the report is used, and the result
    says so: compare its kid with your server's (``custody recert verify --data-dir`` pins it)."""
    data = path.read_bytes()
    form = _format_of(path, data)
    found = _JWS.findall(data)
    if not found:
        return Verification(form, False, None, "none", ["no signature found in the file"])
    jws = found[-1].decode()
    try:
        parsed = parse_compact(jws)
        body: dict[str, Any] = orjson.loads(parsed.payload)
    except (JwsError, orjson.JSONDecodeError) as exc:
        return Verification(form, False, None, "none", [f"the signature is unreadable: {exc}"])
    source = "the server key you gave"
    if public_key is None:
        source = "the key embedded in the report"
        try:
            embedded = OKPAlgorithm.from_jwk(body["signed_by"]["jwk"])
        except (KeyError, TypeError, ValueError) as exc:
            return Verification(form, False, parsed.kid, source, [f"no usable key in the report: {exc}"])
        public_key = embedded if isinstance(embedded, Ed25519PublicKey) else None
    if not isinstance(public_key, Ed25519PublicKey) or not verify_signature(parsed, public_key):
        return Verification(
            form, False, parsed.kid, source, [f"signature: not a valid signature by {source} (kid {parsed.kid})"]
        )
    result = Verification(form, True, parsed.kid, source, body=body)
    result.differences = _compare(form, data, body, jws)
    return result


def _format_of(path: Path, data: bytes) -> str:
    if data.startswith(b"%PDF"):
        return "pdf"
    suffix = path.suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    if data.lstrip().startswith(b"{"):
        return "json"
    return "html" if b"<html" in data[:200].lower() else "csv"


def _compare(form: str, data: bytes, body: dict[str, Any], jws: str) -> list[str]:
    if form == "json":
        try:
            shown = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return [f"the file is not JSON: {exc}"]
        return _diff_values("report", body, shown.get("report") if isinstance(shown, dict) else shown)
    if form == "csv":
        return _diff_csv(_csv(body, jws), data.decode(errors="replace"))
    if form == "html":
        return _diff_lines(_html(body, jws), data.decode(errors="replace"))
    from query.recert.pdf import diff_pdf, render_pdf

    return diff_pdf(render_pdf(body, jws), data)


def _diff_values(where: str, signed: Any, shown: Any) -> list[str]:
    if isinstance(signed, dict) and isinstance(shown, dict):
        out = []
        for key in sorted(set(signed) | set(shown)):
            if key not in shown:
                out.append(f"{where}.{key}: signed {_short(signed[key])}, missing from the file")
            elif key not in signed:
                out.append(f"{where}.{key}: not in the signed report, file has {_short(shown[key])}")
            else:
                out += _diff_values(f"{where}.{key}", signed[key], shown[key])
        return out
    if isinstance(signed, list) and isinstance(shown, list):
        out = []
        for index in range(max(len(signed), len(shown))):
            if index >= len(shown):
                out.append(f"{where}[{index}]: signed {_short(signed[index])}, missing from the file")
            elif index >= len(signed):
                out.append(f"{where}[{index}]: not in the signed report, file has {_short(shown[index])}")
            else:
                out += _diff_values(f"{where}[{index}]", signed[index], shown[index])
        return out
    if signed != shown or type(signed) is not type(shown):
        return [f"{where}: signed {_short(signed)}, file has {_short(shown)}"]
    return []


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 120 else text[:117] + "..."


def _checkpoint_line(position: dict[str, Any]) -> str:
    checkpoint = position.get("checkpoint")
    if not checkpoint:
        return "no transparency-log checkpoint yet"
    return f"transparency log {checkpoint['origin']} checkpoint size {checkpoint['size']} root {checkpoint['root']}"


def _csv(body: dict[str, Any], jws: str) -> str:
    out = io.StringIO()
    position = body["log_position"]
    out.write(f"# {body['title']}; window {body['since']} to {body['until']} ({body['window_days']} days)\n")
    out.write(f"# log position: {position['events']} events; {_checkpoint_line(position)}; heads: ")
    out.write(", ".join(f"{e} seq {h['seq']} {h['hash'][:16]}" for e, h in position["heads"].items()) + "\n")
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for agent in body["agents"]:
        writer.writerow({column: csv_cell(value) for column, value in cells(agent).items()})
    out.write(f"# signature: {jws}\n")
    return out.getvalue()


def _diff_csv(signed: str, shown: str) -> list[str]:
    def rows(text: str) -> list[dict[str, str]]:
        return list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))

    def comments(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("#")]

    try:
        expected, actual = rows(signed), rows(shown)
    except csv.Error as exc:
        return [f"the file is not CSV: {exc}"]
    out = [
        f"comment line: signed {a!r}, file has {b!r}"
        for a, b in zip(comments(signed), comments(shown), strict=False)
        if a != b
    ]
    for index in range(max(len(expected), len(actual))):
        if index >= len(actual):
            out.append(f"row {expected[index]['agent']}: missing from the file")
            continue
        if index >= len(expected):
            out.append(f"row {index + 1} ({actual[index].get('agent')}): not in the signed report")
            continue
        for column in CSV_COLUMNS:
            if expected[index].get(column) != actual[index].get(column):
                out.append(
                    f"row {expected[index]['agent']}, column {column}: signed {expected[index].get(column)!r},"
                    f" file has {actual[index].get(column)!r}"
                )
    return out


def _diff_lines(signed: str, shown: str) -> list[str]:
    out = []
    for group in difflib.SequenceMatcher(None, signed.splitlines(), shown.splitlines()).get_grouped_opcodes(0):
        for tag, i1, i2, j1, j2 in group:
            if tag != "equal":
                before = " / ".join(signed.splitlines()[i1:i2])[:200]
                after = " / ".join(shown.splitlines()[j1:j2])[:200]
                out.append(f"line {j1 + 1}: signed {before!r}, file has {after!r}")
    return out


def _html(body: dict[str, Any], jws: str) -> str:
    e = html.escape
    summary = body["summary"]
    position = body["log_position"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(body['title'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f4f6}"
        ".investigate{color:#7c2d12;font-weight:bold}.revoke{color:#b91c1c;font-weight:bold}"
        ".reduce{color:#b45309;font-weight:bold}.keep{color:#15803d}</style>",
        "</head><body>",
        f"<h1>{e(body['title'])}</h1>",
        f"<p>Window: {e(body['since'])} to {e(body['until'])} ({body['window_days']} days). Generated"
        f" {e(body['generated_at'])}. Signed by the Custody server key <code>{e(body['signed_by']['kid'])}</code>.</p>",
        "<h2>Summary</h2><table>",
        *(f"<tr><th>{e(name.replace('_', ' '))}</th><td>{value}</td></tr>" for name, value in summary.items()),
        "</table>",
        f"<h2>Log position</h2><p>{position['events']} events in the tenant's streams;"
        f" {e(_checkpoint_line(position))}; heads:</p><table>",
        "<tr><th>emitter</th><th>seq</th><th>hash</th></tr>",
        *(
            f"<tr><td>{e(name)}</td><td>{head['seq']}</td><td><code>{e(head['hash'])}</code></td></tr>"
            for name, head in position["heads"].items()
        ),
        "</table>",
    ]
    for agent in body["agents"]:
        row = cells(agent)
        parts.append(f"<h2>{e(agent['agent'])}</h2><table>")
        for column in CSV_COLUMNS[1:]:
            value = e(row[column])
            css = f' class="{e(row[column])}"' if column == "recommendation" else ""
            parts.append(f"<tr><th>{e(column.replace('_', ' '))}</th><td{css}>{value}</td></tr>")
        parts.append("</table>")
    parts += [
        f'<script type="application/jose" id="custody-signature">{jws}</script>',
        "</body></html>",
        "",
    ]
    return "\n".join(parts)
