"""Values from the log (or from the URL) inside Markdown, shown as exactly their text.

Streamlit renders titles, captions, alerts, link labels and ``st.markdown`` as Markdown, with its own extensions
(``:red[...]`` colours, ``:material/...:`` icons, ``$...$`` maths) and GitHub's autolinks, which turn any
``http://...``, ``www...`` or e-mail address in a text node into a link, backslash escapes or not. An agent named
``![x](http://attacker/x.png)`` in a caption was an image the browser fetched.

``md`` writes a value as a CommonMark code span: its content is never parsed (no emphasis, link, image, HTML,
directive, maths or autolink), a fence one backtick longer than any run of backticks in the value cannot be
closed from inside, and a space on each side is stripped again by the renderer, so the text shows as it is (line
breaks as spaces), set in monospace as data. Tables (``st.dataframe``), ``st.code`` and ``st.text`` show text as it
is and need none of this.
"""

from __future__ import annotations

import re

__all__ = ["md"]

_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029]+")
_BACKTICKS = re.compile(r"`+")


def md(value: object) -> str:
    """``value`` as a Markdown code span that renders as exactly ``str(value)`` (line breaks as spaces)."""
    text = _LINE_BREAKS.sub(" ", str(value))
    fence = "`" * (1 + max((len(run) for run in _BACKTICKS.findall(text)), default=0))
    return f"{fence} {text} {fence}"
