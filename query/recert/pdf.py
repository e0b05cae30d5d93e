"""The recertification report as a PDF an auditor can file: a title page with the log position and the signature
key, summary figures, one table per agent, page numbers; the signed report embedded as ``custody-report.jws``.

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
    _title_page(pdf, body)
    _summary_page(pdf, body)
    for agent in body["agents"]:
        _agent_section(pdf, agent)
    pdf.embed_file(
        bytes=jws.encode(), basename="custody-report.jws", modification_date=generated_at(body), compress=False
    )
    return bytes(pdf.output())


def _title_page(pdf: _Report, body: dict[str, Any]) -> None:
    pdf.add_page()
    pdf.set_font("helvetica", "B", 22)
    pdf.ln(30)
    pdf.multi_cell(0, 11, latin1(body["title"]), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(6)
    pdf.set_font("helvetica", size=12)
    lines = [
        f"Tenant: {body['tenant']}",
        f"Review window: {body['since']} to {body['until']} ({body['window_days']} days)",
        f"Generated: {body['generated_at']}",
        f"Signed by the Custody server key {body['signed_by']['kid']}",
        f"Computed from the log at {body['log_position']['events']} events; heads of"
        f" {len(body['log_position']['heads'])} emitters (see the next page).",
        _checkpoint(body["log_position"].get("checkpoint")),
        "Verify this file: custody recert verify FILE --data-dir DIR (or --public-key PEM).",
    ]
    for line in lines:
        pdf.multi_cell(0, 8, latin1(line), new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _checkpoint(checkpoint: dict[str, Any] | None) -> str:
    if not checkpoint:
        return "No transparency-log checkpoint had been signed yet."
    return (
        f"Transparency log {checkpoint['origin']}: checkpoint of size {checkpoint['size']}, root {checkpoint['root']}"
        " (check it with custody verify --checkpoint, or a witness)."
    )


def _summary_page(pdf: _Report, body: dict[str, Any]) -> None:
    pdf.add_page()
    pdf.set_font("helvetica", "B", 16)
    pdf.cell(0, 10, "Summary", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("helvetica", size=11)
    with pdf.table(col_widths=(60, 40), width=100, align="LEFT") as table:
        for name, value in body["summary"].items():
            row = table.row()
            row.cell(name.replace("_", " "))
            row.cell(str(value))
    pdf.ln(4)
    pdf.set_font("helvetica", "B", 13)
    pdf.cell(0, 9, "Log position", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("helvetica", size=9)
    with pdf.table(col_widths=(50, 20, 110)) as table:
        header = table.row()
        for title in ("emitter", "seq", "hash"):
            header.cell(title)
        for emitter, head in body["log_position"]["heads"].items():
            row = table.row()
            row.cell(latin1(emitter))
            row.cell(str(head["seq"]))
            row.cell(head["hash"])


def _agent_section(pdf: _Report, agent: dict[str, Any]) -> None:
    pdf.add_page()
    pdf.set_font("helvetica", "B", 15)
    pdf.cell(0, 10, latin1(f"{agent['agent']}: {agent['recommendation']}"), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("helvetica", size=8.5)
    row_text = cells(agent)
    credentials = agent["credentials"]
    if len(credentials) > MAX_CREDENTIALS_SHOWN:
        shown = cells({**agent, "credentials": credentials[-MAX_CREDENTIALS_SHOWN:]})["credentials"]
        row_text["credentials"] = (
            f"{len(credentials)} credentials; the latest {MAX_CREDENTIALS_SHOWN}: {shown}"
            " (all of them are in the CSV and JSON formats)"
        )
    with pdf.table(col_widths=(38, 142), first_row_as_headings=False, text_align="LEFT") as table:
        for column in CSV_COLUMNS[1:]:
            row = table.row()
            row.cell(column.replace("_", " "))
            row.cell(
                latin1(row_text[column]) or "-" if column not in ("decision", "reviewer", "date", "comment") else ""
            )


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
