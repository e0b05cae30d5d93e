"""The finding rules as data: their parameters (thresholds, windows, severity, on or off) in a TOML file, for every
tenant and per tenant, read by ``custody serve --rules`` (continuous detection) and ``custody findings --rules``.

    [defaults]
    denied_burst = { count = 5, window_minutes = 10 }
    deep_delegation = { max_depth = 3 }

    [tenants.acme]
    denied_burst = { count = 3, severity = "high" }   # acme's analysts want fewer denials to count
    shared_credential = { enabled = false }

A tenant's section starts from the defaults. Every kind takes ``severity`` and ``enabled``; the parameters each takes
are in ``PARAMETERS``. Unknown kinds, parameters and values are refused with their place in the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from query.findings import KINDS, RULES, FindingSettings, RuleBook

__all__ = ["PARAMETERS", "load_rules", "rules_table"]

# kind -> {parameter in the file: (FindingSettings field, lowest, highest)}
PARAMETERS: dict[str, dict[str, tuple[str, int, int]]] = {
    "deep_delegation": {"max_depth": ("max_delegation_depth", 1, 32)},
    "over_privileged": {"unused_days": ("unused_scope_days", 1, 3650)},
    "denied_burst": {
        "count": ("burst_denied", 1, 100_000),
        "window_minutes": ("burst_window_minutes", 1, 7 * 24 * 60),
    },
    "action_after_revocation": {"grace_seconds": ("revocation_grace_seconds", 0, 86_400)},
}
_SEVERITIES = ("critical", "high", "medium", "low")
_TENANT = "abcdefghijklmnopqrstuvwxyz0123456789._-"


def load_rules(path: Path) -> RuleBook:
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    problems: list[str] = []
    unknown = set(document) - {"defaults", "tenants"}
    problems += [f"{name}: unknown section (defaults, tenants)" for name in sorted(unknown)]
    defaults = _settings(document.get("defaults", {}), FindingSettings(), "defaults", problems)
    tenants = []
    sections = document.get("tenants", {})
    if not isinstance(sections, dict):
        problems.append("tenants: must be a table of tenants")
        sections = {}
    for tenant, section in sections.items():
        if not tenant or set(tenant) - set(_TENANT) or tenant[0] in "._-":
            problems.append(f"tenants.{tenant}: not a tenant id")
            continue
        tenants.append((tenant, _settings(section, defaults, f"tenants.{tenant}", problems)))
    if problems:
        raise ValueError(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))
    return RuleBook(defaults, tuple(tenants))


def _settings(section: Any, base: FindingSettings, place: str, problems: list[str]) -> FindingSettings:
    if not isinstance(section, dict):
        problems.append(f"{place}: must be a table of kinds")
        return base
    changes: dict[str, Any] = {}
    severities = dict(base.severities)
    disabled = set(base.disabled)
    for kind, values in section.items():
        where = f"{place}.{kind}"
        if kind not in KINDS:
            problems.append(f"{where}: unknown kind (known: {', '.join(KINDS)})")
            continue
        if not isinstance(values, dict):
            problems.append(f'{where}: must be a table like {{ severity = "high" }}')
            continue
        known = PARAMETERS.get(kind, {})
        for name, value in values.items():
            if name == "severity":
                if value not in _SEVERITIES:
                    problems.append(f"{where}.severity: one of {', '.join(_SEVERITIES)}, not {value!r}")
                else:
                    severities[kind] = value
            elif name == "enabled":
                if not isinstance(value, bool):
                    problems.append(f"{where}.enabled: true or false, not {value!r}")
                elif value:
                    disabled.discard(kind)
                else:
                    disabled.add(kind)
            elif name in known:
                field, lowest, highest = known[name]
                if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= highest:
                    problems.append(f"{where}.{name}: a whole number from {lowest} to {highest}, not {value!r}")
                else:
                    changes[field] = value
            else:
                takes = ", ".join(["severity", "enabled", *known])
                problems.append(f"{where}.{name}: unknown parameter ({kind} takes {takes})")
    return replace(base, **changes, severities=tuple(sorted(severities.items())), disabled=frozenset(disabled))


def rules_table(book: RuleBook, tenant: str | None = None) -> list[dict[str, Any]]:
    """Every kind with its severity, parameters and whether it is on, as they apply to ``tenant`` (the defaults)."""
    settings = book.defaults if tenant is None else book.for_tenant(tenant)
    severity_of = dict(settings.severities)
    rows = []
    for kind, (severity, title, owasp) in RULES.items():
        parameters = {name: getattr(settings, field) for name, (field, _, _) in PARAMETERS.get(kind, {}).items()}
        rows.append(
            {
                "kind": kind,
                "enabled": kind not in settings.disabled,
                "severity": severity_of.get(kind, severity),
                "parameters": parameters,
                "title": title,
                "owasp": owasp,
            }
        )
    return rows
