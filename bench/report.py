"""How every benchmark writes its results: OUT.json (raw) and OUT.md (table), the latter ending with
the command that produced it."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, data: dict, markdown: list[str], command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    out.with_suffix(".md").write_text("\n".join([*markdown, "", "Produced by:", "", "```", command, "```", ""]))


def replace_generated(page: Path, start: str, end: str, generated: str, title: str) -> None:
    """Write ``generated`` (which begins with ``start`` and ends with ``end``) into ``page`` between
    those markers, keeping what is written by hand around them; append it to a new or unmarked page."""
    text = page.read_text() if page.is_file() else f"# {title}\n\n"
    if start in text and end in text:
        text = text[:text.index(start)] + generated + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    page.write_text(text)
