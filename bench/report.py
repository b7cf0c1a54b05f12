"""How every benchmark writes its results: OUT.json (raw) and OUT.md (table), the latter ending with
the command that produced it."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, data: dict, markdown: list[str], command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    out.with_suffix(".md").write_text("\n".join([*markdown, "", "Produced by:", "", "```", command, "```", ""]))
