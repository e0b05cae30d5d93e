"""The recertification report as a PDF an auditor reads in a minute and can file: page one summarises it (agents by
recommendation, the agents with open findings and why, the log position it was computed at, how to verify it); then
one row per agent with the decision, reviewer, date and comment columns; the details in appendix A (credentials,
users, scopes with last use), every emitter's head in appendix B; page numbers; the signed report embedded as
``custody-report.jws``.

Rendering is deterministic (fixed creation date, uncompressed streams, core fonts), so the verifier renders the
signed copy again and compares: identical bytes pass; otherwise the text of each page is compared and every
changed line is named with its page. Core fonts cover Latin-1: other characters print as ``?`` (the embedded
signed JSON keeps them exactly).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from query.recert.rows import CSV_COLUMNS, cells, generated_at

__all__ = ["diff_pdf", "render_pdf"]

MAX_CREDENTIALS_SHOWN = 10
_STREAM = re.compile(rb"stream\r?\n(.*?)\r?\nendstream", re.DOTALL)
_SHOW = re.compile(rb"\(((?:\\.|[^\\)])*)\)\s*Tj")


class _Report(FPDF):
    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(orientation="portrait", unit="mm", format="A4")
        self.body = body
        self.set_compression(False)
        self.set_creation_date(generated_at(body))
        self.set_title(latin1(body["title"]))
        self.set_author("Custody")
        self.set_auto_page_break(auto=True, margin=18)
        self.alias_nb_pages()

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("helvetica", size=8)
        self.set_text_color(110)
        left = f"Custody access review, tenant {self.body['tenant']}, signed by {self.body['signed_by']['kid']}"
        self.cell(0, 6, latin1(left), align="L")
        self.set_x(-40)
        self.cell(30, 6, f"Page {self.page_no()} of {{nb}}", align="R")
        self.set_text_color(0)


def latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def render_pdf(body: dict[str, Any], jws: str) -> bytes:
    pdf = _Report(body)
    _summary_page(pdf, body)
    _decisions(pdf, body)
    _appendix(pdf, body)
    pdf.embed_file(
        bytes=jws.encode(), basename="custody-report.jws", modification_date=generated_at(body), compress=False
    )
    return bytes(pdf.output())


ORDER = ("investigate", "revoke", "reduce", "keep")  # the recommendations, the most urgent first
SUMMARY_FINDINGS = 12  # agents with open findings named on page one; the rest are in the decisions table


def _heading(pdf: _Report, text: str, size: float = 13) -> None:
    pdf.set_font("helvetica", "B", size)
    pdf.cell(0, size * 0.62, latin1(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("helvetica", size=9.5)


def _summary_page(pdf: _Report, body: dict[str, Any]) -> None:
    """Page one: what the review says, where in the log it was computed, how to check it."""
    pdf.add_page()
    pdf.set_font("helvetica", "B", 17)
    pdf.multi_cell(0, 8, latin1(body["title"]), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("helvetica", size=9.5)
    pdf.multi_cell(
        0,
        5,
        latin1(
            f"Tenant {body['tenant']}, window {body['since']} to {body['until']} ({body['window_days']} days)."
            f" Generated {body['generated_at']}, signed by the Custody server key {body['signed_by']['kid']}."
        ),
        align="L",
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
    )
    pdf.ln(3)
    agents = body["agents"]
    counts = {name: sum(1 for agent in agents if agent["recommendation"] == name) for name in ORDER}
    _heading(pdf, f"{len(agents)} agents by recommendation")
    with pdf.table(
        col_widths=(28, 14, 148), text_align=("LEFT", "RIGHT", "LEFT"), line_height=5, first_row_as_headings=False
    ) as table:
        for name in ORDER:
            row = table.row()
            row.cell(name)
            row.cell(str(counts[name]))
            row.cell(latin1(", ".join(a["agent"] for a in agents if a["recommendation"] == name) or "-"))
    pdf.ln(3)
    flagged = [agent for agent in agents if _open(agent)]
    _heading(pdf, f"Agents with open findings: {len(flagged)}")
    if flagged:
        with pdf.table(col_widths=(34, 32, 124), text_align="LEFT", line_height=4.6) as table:
            header = table.row()
            for title in ("agent", "recommendation", "why (open findings, the most severe first)"):
                header.cell(title)
            for agent in flagged[:SUMMARY_FINDINGS]:
                row = table.row()
                row.cell(latin1(agent["agent"]))
                row.cell(agent["recommendation"])
                row.cell(latin1(_why(_open(agent))))
        if len(flagged) > SUMMARY_FINDINGS:
            pdf.cell(0, 5, f"and {len(flagged) - SUMMARY_FINDINGS} more: see the decisions", new_x=XPos.LMARGIN,
                     new_y=YPos.NEXT)  # fmt: skip
    else:
        pdf.cell(0, 6, "None.", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(3)
    position = body["log_position"]
    _heading(pdf, "Log position")
    lines = [
        f"Computed from {position['events']:,} events; the head of each of its {len(position['heads'])} emitters"
        " is in appendix B.",
        _checkpoint(position.get("checkpoint")),
    ]
    if position.get("findings"):
        lines.append(f"Findings: {position['findings']}.")
    for line in lines:
        pdf.multi_cell(0, 5, latin1(line), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(3)
    _heading(pdf, "How to verify this report")
    for line in (
        "1. The signature: custody recert verify FILE --data-dir DIR (or --public-key PEM of the server key). This"
        " PDF embeds its signed copy (custody-report.jws); a changed page is named with its text.",
        "2. The log it was computed from: custody verify --data-dir DIR checks every event's hash, signature and chain,"
        " and that the log holds what the checkpoint above says; a witness cosigns checkpoints independently.",
        "3. The decisions (next page): fill in decision, reviewer, date and comment for each agent; the details each"
        " recommendation rests on (credentials, users, scopes and their last use) are in appendix A.",
    ):
        pdf.multi_cell(0, 5, latin1(line), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _checkpoint(checkpoint: dict[str, Any] | None) -> str:
    if not checkpoint:
        return "No transparency-log checkpoint had been signed yet."
    return (
        f"Transparency log {checkpoint['origin']}: checkpoint of size {checkpoint['size']}, root {checkpoint['root']}"
        " (check it with custody verify --checkpoint, or a witness)."
    )


def _open(agent: dict[str, Any]) -> list[dict[str, Any]]:
    rank = {"critical": 0, "high": 1, "medium": 2, "low": 3}
    found = [f for f in agent["findings"] if f.get("status", "open") in ("open", "acknowledged")]
    return sorted(found, key=lambda f: rank.get(f["severity"], 4))


def _why(found: list[dict[str, Any]], limit: int = 2) -> str:
    text = "; ".join(f"{f['severity']}: {f['title']}" for f in found[:limit])
    return text + (f"; and {len(found) - limit} more" if len(found) > limit else "")


def _decisions(pdf: _Report, body: dict[str, Any]) -> None:
    """One row per agent: the recommendation and its reason, and empty columns for the reviewer."""
    pdf.add_page()
    _heading(pdf, "Decisions", 15)
    pdf.set_font("helvetica", size=8)
    agents = sorted(body["agents"], key=lambda a: (ORDER.index(a["recommendation"]) if a["recommendation"] in ORDER
                                                   else len(ORDER), a["agent"]))  # fmt: skip
    with pdf.table(
        col_widths=(30, 27, 59, 17, 20, 14, 23),
        text_align="LEFT",
        line_height=4.2,
        padding=(2.2, 1),  # room to write in each row
        repeat_headings=1,
    ) as table:
        header = table.row()
        for title in ("agent", "recommendation", "why", "decision", "reviewer", "date", "comment"):
            header.cell(title)
        for agent in agents:
            row = table.row()
            row.cell(latin1(agent["agent"]))
            row.cell(agent["recommendation"])
            row.cell(latin1(_shorten(agent["justification"], 170)))
            for column in REVIEW_COLUMNS:
                row.cell(latin1(agent.get("review", {}).get(column, "")))


REVIEW_COLUMNS = ("decision", "reviewer", "date", "comment")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _appendix(pdf: _Report, body: dict[str, Any]) -> None:
    """A: each agent's details, one after the other (not a page each); B: every emitter's head."""
    pdf.add_page()
    _heading(pdf, "Appendix A: the details of each agent", 15)
    for agent in body["agents"]:
        if pdf.will_page_break(30):
            pdf.add_page()
        pdf.ln(2)
        pdf.set_font("helvetica", "B", 11)
        pdf.cell(0, 7, latin1(f"{agent['agent']}: {agent['recommendation']}"), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font("helvetica", size=7.5)
        row_text = cells(agent)
        credentials = agent["credentials"]
        if len(credentials) > MAX_CREDENTIALS_SHOWN:
            shown = cells({**agent, "credentials": credentials[-MAX_CREDENTIALS_SHOWN:]})["credentials"]
            row_text["credentials"] = (
                f"{len(credentials)} credentials; the latest {MAX_CREDENTIALS_SHOWN}: {shown}"
                " (all of them are in the CSV and JSON formats)"
            )
        with pdf.table(col_widths=(34, 156), first_row_as_headings=False, text_align="LEFT", line_height=3.8) as table:
            for column in CSV_COLUMNS[1:]:
                if column in REVIEW_COLUMNS or column == "recommendation":
                    continue
                row = table.row()
                row.cell(column.replace("_", " "))
                row.cell(latin1(row_text[column]) or "-")
    pdf.add_page()
    _heading(pdf, "Appendix B: log position", 15)
    pdf.set_font("helvetica", size=8)
    with pdf.table(col_widths=(50, 20, 120), line_height=4) as table:
        header = table.row()
        for title in ("emitter", "seq", "hash"):
            header.cell(title)
        for emitter, head in body["log_position"]["heads"].items():
            row = table.row()
            row.cell(latin1(emitter))
            row.cell(str(head["seq"]))
            row.cell(head["hash"])


def _page_texts(data: bytes) -> list[list[str]]:
    pages = []
    for stream in _STREAM.findall(data):
        if b"BT" not in stream:
            continue
        texts = [re.sub(rb"\\(.)", rb"\1", match).decode("latin-1") for match in _SHOW.findall(stream)]
        pages.append(texts)
    return pages


def diff_pdf(signed: bytes, shown: bytes) -> list[str]:
    if signed == shown:
        return []
    expected, actual = _page_texts(signed), _page_texts(shown)
    if not actual:
        return ["the file's pages cannot be read as this report's PDF (re-saved or compressed?)"]
    out = []
    if len(expected) != len(actual):
        out.append(f"pages: signed {len(expected)}, file has {len(actual)}")
    for number, (before, after) in enumerate(zip(expected, actual, strict=False), 1):
        matcher = difflib.SequenceMatcher(None, before, after)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag != "equal":
                out.append(f"page {number}: signed {' '.join(before[i1:i2])!r}, file has {' '.join(after[j1:j2])!r}")
    return out or ["the PDF's bytes differ from the signed report's rendering (outside the page text)"]
