"""What every dashboard page shares: configuration, the signed-in principal, the time window, query params, caching.

The app reads the lake of ``CUSTODY_DATA_DIR`` read-only through ``query/`` and authenticates with the read-API
tokens of ``CUSTODY_TOKEN_FILE`` (or ``CUSTODY_READ_TOKENS``). The token is checked again on every rerun, so a
revoked token stops working at the next click. Every query goes through a cached function whose arguments include
the principal's tenant scope, so one tenant's cached result can never answer another's request. Results are
cached for ``FRESH_SECONDS``: new events show within seconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ParamSpec, TypeVar

import streamlit as st

from dashboard.text import md
from query.lake import LakeReader
from query.tokens import Principal, TokenStore
from store.ground.errors import CustodyError, Unauthorized

__all__ = [
    "FRESH_SECONDS",
    "REPORT_SECONDS",
    "SLOW_SECONDS",
    "Session",
    "cached",
    "cached_for",
    "data_dir",
    "now",
    "require_session",
    "session",
    "sign_in_form",
    "time_window",
]

P = ParamSpec("P")
R = TypeVar("R")
FRESH_SECONDS = 5
SLOW_SECONDS = 120  # findings
REPORT_SECONDS = 600  # access reviews: a report states the log position it was computed from
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}


@dataclass(frozen=True)
class Session:
    principal: Principal
    data_dir: Path

    @property
    def reader(self) -> LakeReader:
        return LakeReader(self.data_dir)

    @property
    def tenant(self) -> str | None:
        """The tenant the principal may see: bound tokens get theirs, unbound ones everything (None)."""
        return self.principal.tenant

    @property
    def may_verify(self) -> bool:
        return self.principal.role in ("admin", "auditor")


def data_dir() -> Path:
    value = os.environ.get("CUSTODY_DATA_DIR")
    if not value:
        st.error("CUSTODY_DATA_DIR is not set: start the dashboard with `custody dashboard --data-dir DIR`.")
        st.stop()
    return Path(value)


def token_store() -> TokenStore:
    path = os.environ.get("CUSTODY_TOKEN_FILE")
    return TokenStore(Path(path) if path else None)


def session() -> Session | None:
    """The signed-in session, re-authenticated on every run, or None."""
    token = st.session_state.get("token")
    if not token:
        return None
    try:
        principal = token_store().authenticate(token)
    except Unauthorized:
        st.session_state.pop("token", None)
        st.session_state["sign_in_error"] = "That token is no longer valid (revoked?). Sign in again."
        return None
    return Session(principal, data_dir())


def require_session() -> Session:
    """The signed-in session (app.py signs in before any page runs; this is the pages' own guard)."""
    current = session()
    if current is None:
        st.warning("Sign in first.")
        st.stop()
    return current


def sign_in_form() -> None:
    st.title("Custody")
    st.caption("Delegation-chain audit log and forensics for AI agents")
    if error := st.session_state.pop("sign_in_error", None):
        st.error(error)
    with st.form("sign_in"):
        token = st.text_input("Access token", type="password", key="sign_in_token", help="custody token issue ...")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        try:
            token_store().authenticate(token.strip())
        except Unauthorized as exc:
            st.error(f"Sign-in failed: {md(exc)}")
            return
        st.session_state["token"] = token.strip()
        st.rerun()


def now() -> datetime:
    """The dashboard's clock (one place, so a benchmark can replay an old lake as if it were current)."""
    return datetime.now(UTC)


def time_window(key: str = "window") -> tuple[datetime | None, datetime]:
    """A window picker (default the last 24 h) kept in the URL as ``?window=``; returns (since, until).

    ``until`` is the next whole minute, so repeated runs within a minute ask the same question (and hit the cache).
    """
    choice = st.segmented_control(
        "Time window",
        [*WINDOWS, "all"],
        default="24h",
        key=key,
        bind="query-params",
        help="Events that occurred in this window (UTC), up to now.",
    )
    until = now().replace(second=0, microsecond=0) + timedelta(minutes=1)
    return (None if choice == "all" else until - WINDOWS[choice or "24h"]), until


def cached(function: Callable[P, R]) -> Callable[P, R]:
    """Cache a query for FRESH_SECONDS: new events show within seconds. Arguments must include everything that
    scopes the result (the tenant!)."""
    return cached_for(FRESH_SECONDS)(function)


def cached_for(ttl: int) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Cache for ``ttl`` seconds: analyses that take seconds on a large lake (findings, access reviews) keep their
    result longer and say when it was computed."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        wrapped: Callable[P, R] = st.cache_data(ttl=ttl, show_spinner=False, max_entries=64)(function)
        return wrapped

    return decorate


def show_error(exc: CustodyError) -> None:
    st.error(md(exc))  # error messages quote what was asked for (event ids, names): never Markdown
    for detail in exc.details:
        st.caption(md(detail))
