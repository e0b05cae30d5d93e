"""The "Download evidence bundle" button of the path, blast radius and findings pages.

The bundle is written only when the button is clicked (Streamlit's deferred download), within the signed-in
principal's tenant, by ``query.bundle.write_bundle``; a selection that cannot be bundled (too large, not yet in a
checkpoint) downloads as a short text saying why rather than breaking the page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

from dashboard.context import Session
from query.bundle import write_bundle
from store.ground.errors import CustodyError

__all__ = ["bundle_button"]

HELP = (
    "One file with these events, the keys that signed them and their inclusion proofs to the newest checkpoint."
    " Anyone with the log's key checks it offline: custody bundle verify FILE --log-key VKEY"
)


def bundle_button(current: Session, event_ids: Sequence[str], selection: dict[str, Any], *, key: str) -> None:
    ids = list(event_ids)

    def build() -> bytes:
        try:
            return write_bundle(current.data_dir, ids, selection, tenant=current.tenant)
        except CustodyError as exc:
            return f"No evidence bundle: {exc}\n".encode()

    name = "evidence-" + "-".join(str(value) for value in selection.values())[:80].replace("/", "_") + ".note"
    st.download_button(
        "Download evidence bundle",
        build,
        file_name=name,
        mime="text/plain",
        key=key,
        on_click="ignore",
        help=HELP,
        disabled=not ids,
    )
