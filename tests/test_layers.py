"""The layering of docs/architecture.md, enforced: import-linter's contracts in pyproject.toml.

custody -> sample_data | dashboard -> query | ingest -> store, and store.ground (errors, canonical JSON, JWS and
keys, the server key, the data-dir layout, the error envelope) imports nothing else of Custody.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT = REPO / ".venv" / "bin" / "lint-imports"
PACKAGES = ("custody", "sample_data", "dashboard", "query", "ingest", "store")


def lint(where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(where / "pyproject.toml"), "--no-cache"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_layers_hold() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden", "contract"),
    [
        ("store/ground/errors.py", "import ingest.service", "The ground imports nothing else of Custody"),
        ("query/search.py", "import ingest.app", "Layers"),
        ("store/engine.py", "import query.search", "Layers"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, forbidden: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{forbidden}  # noqa\n", encoding="utf-8")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "BROKEN" in result.stdout
    assert contract in result.stdout


def test_no_module_imports_itself_back() -> None:
    """No import cycles anywhere (chains <-> integrity, reports <-> report_pdf and activity <-> incidents were)."""
    import grimp

    graph = grimp.build_graph(*PACKAGES)
    cycles = sorted(
        {
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.chain_exists(importer=imported, imported=module)
        }
    )
    assert cycles == []


def test_reading_the_lake_loads_no_writer() -> None:
    """``import query.search`` (and the other forensic reads) loaded the WAL and the write engine."""
    probe = (
        "import json, sys, query.search, query.paths, query.findings, query.blast;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('store', 'ingest'))))"
    )
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = set(json.loads(result.stdout))
    assert not loaded & {"store.engine", "store.wal", "store.lake", "store.indexer", "store.quarantine"}
    assert not {name for name in loaded if name.startswith("ingest")}
