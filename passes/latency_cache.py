"""The latency tables' cache: one JSON file, one entry per measuring setup, one table per layer signature.

An entry's key is a hash of every part the numbers depend on (device, torch version, dtype, threads, eager or
compiled mode, the timer, the example input's shapes); a table inside it is found by the layer's signature
(kind, widths, input shape, hyper-parameters). A changed part gives another key, so old numbers are never read
for a new setup; entries measured under another torch version are dropped when the file is written (they can
never match again). An unreadable file is treated as empty and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Tuple

from .latency_model import LayerTable

FORMAT = 2  # 2: tables carry each dim's kernel block (passes/latency_blocks.py); format-1 files are not read


def cache_key(parts: Dict[str, Any]) -> str:
    """A short stable hash of ``parts`` (order of the dict does not matter)."""
    text = json.dumps({str(k): str(v) for k, v in parts.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _read(path: str) -> Dict[str, Any]:
    """The file's content, or an empty cache when it is missing, unreadable or of another format."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {"format": FORMAT, "entries": {}}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return {"format": FORMAT, "entries": {}}
    return data


def load_tables(path: str, parts: Dict[str, Any]) -> Dict[str, LayerTable]:
    """The tables cached under ``parts`` (signature -> table); empty when none or when ``path`` is ''."""
    if not path:
        return {}
    entry = _read(path)["entries"].get(cache_key(parts))
    if not isinstance(entry, dict) or entry.get("parts") != _plain(parts):
        return {}
    tables = {}
    for signature, table in entry.get("layers", {}).items():
        try:
            tables[signature] = LayerTable.from_dict(table)
        except (KeyError, TypeError, ValueError):  # a damaged table: measure that layer again
            continue
    return tables


def store_tables(path: str, parts: Dict[str, Any], tables: Dict[str, LayerTable]) -> None:
    """Merge ``tables`` into the entry for ``parts`` and write the file atomically (nothing when ``path`` is '').
    Entries of other torch versions are dropped."""
    if not path:
        return
    data = _read(path)
    key = cache_key(parts)
    plain = _plain(parts)
    entries = {k: e for k, e in data["entries"].items()
               if isinstance(e, dict) and e.get("parts", {}).get("torch") == plain.get("torch")}
    layers = dict(entries.get(key, {}).get("layers", {}))
    layers.update({sig: t.to_dict() for sig, t in tables.items()})
    entries[key] = {"parts": plain, "layers": layers}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"format": FORMAT, "entries": entries}, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _plain(parts: Dict[str, Any]) -> Dict[str, str]:
    return {str(k): str(v) for k, v in sorted(parts.items())}


def split_cached(signatures: Tuple[str, ...], cached: Dict[str, LayerTable]) -> Tuple[Tuple[str, ...], ...]:
    """(signatures with a cached table, signatures still to measure), each without repeats, in order."""
    unique = tuple(dict.fromkeys(signatures))
    return tuple(s for s in unique if s in cached), tuple(s for s in unique if s not in cached)
