"""What both HTTP faces serve of the transparency log: a tile by its tlog-tiles path, a proof or a clear error."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

from store.ground.errors import InvalidInput, NotFound
from store.ground.tlog import LogError
from store.merkle_log import TILE_WIDTH, TileStore

__all__ = ["proof_or_invalid", "read_tile"]

# <L>/<N>[.p/<W>] or entries/<N>[.p/<W>]: L 0-63, N in 3-digit elements (all but the last x-prefixed), W 1-255
_TILE = re.compile(
    r"(?P<level>entries|0|[1-9]|[1-5][0-9]|6[0-3])/(?P<index>(?:x[0-9]{3}/){0,6}[0-9]{3})(?:\.p/(?P<width>[1-9][0-9]{0,2}))?"
)


def read_tile(tiles: TileStore, path: str) -> bytes:
    """The bytes of the tile at a tlog-tiles ``path``; NotFound for a malformed path or a tile not written."""
    match = _TILE.fullmatch(path)
    if match is None or (match["width"] is not None and int(match["width"]) >= TILE_WIDTH):
        raise NotFound(
            f"no tile {path[:200]!r}: tiles are <L>/<N>[.p/<W>] or entries/<N>[.p/<W>] (c2sp.org/tlog-tiles)"
        )
    width = TILE_WIDTH if match["width"] is None else int(match["width"])
    index = int(match["index"].replace("x", "").replace("/", ""))
    level: int | str = match["level"] if match["level"] == "entries" else int(match["level"])
    try:
        return tiles.path(level, index, width).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"tile {path} is not in the log (yet)") from None


def proof_or_invalid(prove: Callable[[int, int], list[bytes]], first: int, second: int) -> list[str]:
    """A proof as base64 strings; a request the log cannot prove is InvalidInput with the reason."""
    try:
        return [base64.b64encode(item).decode() for item in prove(first, second)]
    except LogError as exc:
        raise InvalidInput(str(exc)) from exc
