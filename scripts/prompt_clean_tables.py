#!/usr/bin/env python3
"""Writes src/prompt_clean/tables.json: the character tables behind DiffSynth's prompt cleaning
for Wan's umT5 tokenizer (`basic_clean` = ftfy.fix_text + html.unescape twice, then
`whitespace_clean`), read from the pinned ftfy and from this Python's html and re modules, so
that flowstep's Rust port (src/prompt_clean.rs) applies the very same tables.
    VENV=$(scripts/setup_python.sh); $VENV/bin/python scripts/prompt_clean_tables.py
export/tests/test_prompt_clean.py checks the committed file equals a fresh run, and flowstep's
cleaning equals DiffSynth's on every entity and a corpus of prompts."""

from __future__ import annotations

import html
import html.entities
import json
import re
import sys
import unicodedata
from pathlib import Path

import ftfy
import ftfy.bad_codecs  # noqa: F401  (registers sloppy-windows-1252)
from ftfy import chardata

OUT = Path(__file__).resolve().parents[1] / "src" / "prompt_clean" / "tables.json"
ALL = range(0x110000)


def matching(pattern: str) -> list[int]:
    """Every code point (surrogates excluded: Rust strings cannot hold them) the pattern matches."""
    regex = re.compile(pattern)
    return [c for c in ALL if not 0xD800 <= c <= 0xDFFF and regex.fullmatch(chr(c))]


def tables() -> dict:
    whitespace = matching(r"\s")
    assert whitespace == [c for c in ALL if not 0xD800 <= c <= 0xDFFF and chr(c).isspace()], "\\s and str.strip differ"
    return {
        "generated_by": "scripts/prompt_clean_tables.py",
        "ftfy": ftfy.__version__,
        "python": sys.version.split()[0],
        "unicode": unicodedata.unidata_version,
        # html.unescape: named references (with and without ';'), and its numeric rules.
        "html5": dict(sorted(html.entities.html5.items())),
        "invalid_charrefs": {str(k): v for k, v in sorted(html._invalid_charrefs.items())},
        "invalid_codepoints": sorted(html._invalid_codepoints),
        # ftfy.fix_text's fixers, in its order.
        "ftfy_html_entities": dict(sorted(chardata.HTML_ENTITIES.items())),
        "c1": {str(c): bytes([c]).decode("sloppy-windows-1252") for c in range(0x80, 0xA0)},
        "ligatures": {str(k): v for k, v in sorted(chardata.LIGATURES.items())},
        "width": {str(k): v for k, v in sorted(chardata.WIDTH_MAP.items())},
        "single_quotes": matching(chardata.SINGLE_QUOTE_RE.pattern),
        "double_quotes": matching(chardata.DOUBLE_QUOTE_RE.pattern),
        "control": sorted(chardata.CONTROL_CHARS),
        # Python's \d (the ANSI escapes' parameters) and \s (whitespace_clean, str.strip).
        "decimal_digits": matching(r"\d"),
        "whitespace": whitespace,
    }


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(tables(), ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
