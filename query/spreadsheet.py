"""CSV that a spreadsheet opens as text: a cell from the log is never a formula.

Values in the log come from emitters (agent names, resource ids, reasons) and a CSV is opened by auditors in
spreadsheets, which evaluate a cell that begins with ``=``, ``+``, ``-`` or ``@`` (and, in some, after a leading
tab or carriage return) as a formula: ``=HYPERLINK(...)`` in a resource id would become a link in the access
review. As OWASP recommends, such a cell is written with a leading single quote, which spreadsheets show as text;
the csv module quotes the rest.
"""

from __future__ import annotations

__all__ = ["FORMULA_TRIGGERS", "csv_cell"]

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """``value`` as a CSV cell: a string that a spreadsheet would evaluate gets a leading ``'``; numbers, None and
    other strings are unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value
