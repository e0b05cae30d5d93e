"""The credentials revoked so far, as Custody's log has them: the gateway polls the read API for the
``credential.revoked`` events of its tenant and denies every call made with one of those credentials.

When the read API cannot be reached the last list stays in force (and /healthz says since when it is stale);
before the first answer nothing is known to be revoked, which /healthz also says.
"""

from __future__ import annotations

import logging
import time

import anyio
import httpx

from custody.gateway.config import RevocationsConfig

__all__ = ["Revocations"]

log = logging.getLogger("custody.gateway")
_PAGES = 1000  # at most 1,000 pages of 1,000 revocations


class Revocations:
    def __init__(self, config: RevocationsConfig) -> None:
        self.config = config
        self.revoked: frozenset[str] = frozenset()
        self.refreshed_at: float | None = None
        self.error: str | None = None

    def __contains__(self, credential_id: object) -> bool:
        return credential_id in self.revoked

    async def run(self) -> None:
        token = self.config.token_file.read_text().strip()
        async with httpx.AsyncClient(
            base_url=self.config.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as client:
            while True:
                try:
                    self.revoked = await self._fetch(client)
                    self.refreshed_at, self.error = time.time(), None
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    self.error = f"{type(exc).__name__}: {exc}"
                    log.warning("cannot refresh the revoked credentials (keeping %d known): %s", len(self.revoked), exc)
                await anyio.sleep(self.config.poll_seconds)

    async def _fetch(self, client: httpx.AsyncClient) -> frozenset[str]:
        revoked: set[str] = set()
        cursor: str | None = None
        for _ in range(_PAGES):
            params: dict[str, str | int] = {"type": "credential.revoked", "limit": 1000}
            if cursor:
                params["cursor"] = cursor
            response = await client.get("/v1/events", params=params)
            response.raise_for_status()
            page = response.json()
            revoked.update(str(event["credential_id"]) for event in page["events"] if event.get("credential_id"))
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return frozenset(revoked)

    def health(self) -> dict[str, object]:
        return {
            "known": len(self.revoked),
            "refreshed_at": self.refreshed_at,
            "error": self.error,
        }
