"""A copy of each agent's last valid spec beside the store: <state-dir>/specs/<name>.json.

Effects layer, written by controller.store after each commit that changed an agent, read only
when the store was lost or set aside as corrupt, so that an agent whose manifest is invalid at
that moment keeps running on its last valid spec. It must not be read in normal operation: the
store is the record, this is only its spare.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("agentctl.store")


def _safe(name: str) -> bool:
    # agent names are checked against the name pattern long before; this only keeps paths inside dir
    return bool(name) and "/" not in name and not name.startswith(".") and "\0" not in name


def save(directory: Path, name: str, row: dict[str, Any] | None) -> None:
    """Write (or, for None, remove) one agent's copy. Failing is logged: the store still has it."""
    if not _safe(name):
        return
    path = directory / f"{name}.json"
    try:
        if row is None:
            path.unlink(missing_ok=True)
            return
        directory.mkdir(mode=0o700, exist_ok=True)
        _atomic_write(path, json.dumps(row, separators=(",", ":")))
    except OSError as exc:
        log.warning("cannot keep the spare copy of %s's spec in %s: %s", name, directory, exc.strerror or exc)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(directory: Path) -> list[dict[str, Any]]:
    """Every readable copy; an unreadable one is logged and skipped."""
    try:
        files = sorted(directory.glob("*.json"))
    except OSError:
        return []
    rows = []
    for path in files:
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("skipping the unreadable spare spec %s: %s", path, exc)
            continue
        if isinstance(row, dict) and row.get("name") == path.stem:
            rows.append(row)
    return rows
