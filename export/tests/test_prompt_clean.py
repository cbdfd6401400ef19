"""flowstep cleans a prompt before tokenizing exactly as DiffSynth does for Wan's umT5
(`whitespace_clean(basic_clean(text))` in diffsynth/models/wan_video_text_encoder.py: ftfy.fix_text,
html.unescape twice, whitespace runs to one space), so that a prompt flowstep encodes at training
time gets the tokens `prepare` gave the same caption. Reference: DiffSynth's own functions, run
here; flowstep's side: the hidden `flowstep clean-prompts`, which calls the text encoder's cleaning.

Not ported, and so not in the corpus: ftfy's mojibake repair (`fix_encoding`, e.g. "sÃ³" -> "só"),
which rests on ftfy's statistical badness heuristics (src/prompt_clean.rs says so).
"""

from __future__ import annotations

import html.entities
import importlib.util
import json
import random
import re
import subprocess

import pytest

from diffsynth.models.wan_video_text_encoder import basic_clean, whitespace_clean

from independent import ROOT, flowstep_bin


def flowstep_clean(prompts: list[str]) -> list[str]:
    stdin = "".join(json.dumps(p) + "\n" for p in prompts)
    r = subprocess.run([str(flowstep_bin()), "clean-prompts"], input=stdin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def diffsynth_clean(prompt: str) -> str:
    return whitespace_clean(basic_clean(prompt))


def wan_negative_prompt() -> str:
    source = (ROOT / "src" / "sample.rs").read_text(encoding="utf-8")
    return re.search(r'pub const WAN_NEGATIVE_PROMPT: &str = "([^"]+)";', source).group(1)


def tables() -> dict:
    spec = importlib.util.spec_from_file_location("prompt_clean_tables", ROOT / "scripts" / "prompt_clean_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tables()


def test_committed_tables_equal_the_pinned_ftfy_and_python():
    """src/prompt_clean/tables.json is what scripts/prompt_clean_tables.py reads from the pinned
    ftfy and Python (a version bump that changes a table fails here). Tables read under another
    Python or Unicode version may differ in characters no prompt is likely to hold: then only
    the behaviour test below, which runs everywhere, applies."""
    committed = json.loads((ROOT / "src" / "prompt_clean" / "tables.json").read_text(encoding="utf-8"))
    here = tables()
    if (committed["python"].rsplit(".", 1)[0], committed["unicode"]) != (here["python"].rsplit(".", 1)[0], here["unicode"]):
        pytest.skip(f"tables written under Python {committed['python']} / Unicode {committed['unicode']}, "
                    f"this is {here['python']} / {here['unicode']}")
    del committed["python"], here["python"]  # the patch release may differ
    assert committed == json.loads(json.dumps(here, ensure_ascii=False))


def corpus() -> list[str]:
    t = tables()
    prompts = [wan_negative_prompt(), "a red fox runs through snow", "", "   ", "it’s a “fox” ‘running’ ‚low‛",
               "ＬＯＵＤ　ＮＯＩＳＥＳ！", "ﬂubberiﬁc Ĳssel ǅ", "cafe\u0301 n\u0303 \u212b", "a\r\nb\rc\u2028d\u2029e\u0085f",
               "\x1b[31mred\x1b[0m \x1b[1;2H \x1b[\u0663m \x1b[31 \x1b[m", "a < b &amp; c", "one <\ntwo &amp; three",
               "one &amp;\ntwo < &amp;", "&amp;amp;amp; &amp;lt;b&amp;gt;", "P&EACUTE;REZ &NTILDE; &nTILDE; BUNDESSTRA&SZLIG;E",
               "&#0; &#9; &#13; &#128; &#150; &#159; &#55296; &#1114112; &#99999999999999999999; &#x41; &#X41; &#x; &#; &#65 &#x2019;",
               "&#59; &#x3b; &ampfoo &notit; &not &amp &AMP &AMP; &lt3 &copy2026 &#00065; &#x000041;", "&" * 3 + "a&&amp;",
               "tab\there\vvert\fform\x1cfs\x1dgs\x1ers\x1fus end", "\ufeffbom \u206a\u206f \ufff9\ufffc", "\x00\x08\x0b\x7f"]
    # Every named reference HTML knows, with and without its ';', and ftfy's upper-case forms.
    prompts += [f"x&{name}y" for name in html.entities.html5]
    prompts += [f"x{name}y" for name in t["ftfy_html_entities"]]
    # Every character a table names, between letters.
    for key in ("c1", "ligatures", "width"):
        prompts += [f"a{chr(int(c))}b" for c in t[key]]
    for key in ("single_quotes", "double_quotes", "control", "whitespace"):
        prompts += [f"a{chr(c)}b" for c in t[key]]
    # Random mixtures of all of it (seeded). No pieces that decode to Latin-1 or Windows-1252
    # letters and signs (é, É, ¬, €): side by side these read as mojibake to ftfy, whose repair
    # is not ported (below); each of them is in the lists above on its own.
    pieces = ["fox", "雪", "，", "。", "’", "“", "”", "ﬁ", "Ａ", "\u3000", " ", "\t", "\n", "\r\n", "&amp;", "&lt;", "&gt;",
              "&#x2019;", "&#8217;", "&hellip;", "&nbsp;", "&ALPHA;", "<", ">", "&", ";", "#", "o\u0308\u0301", "\x1b[2m",
              "\x07", "\u2028", "\ufeff", "1", "x", "&#x4E2D;", "&notin;", "&notit;", "ｶﾀｶﾅ", "한국어", "🦊"]
    rng = random.Random(0)
    prompts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 24))) for _ in range(2000)]
    return prompts


def test_flowstep_cleans_prompts_as_diffsynth_does():
    prompts = corpus()
    got = flowstep_clean(prompts)
    assert len(got) == len(prompts)
    wrong = [(p, g, diffsynth_clean(p)) for p, g in zip(prompts, got) if g != diffsynth_clean(p)]
    assert not wrong, f"{len(wrong)} of {len(prompts)} prompts differ, e.g. (prompt, flowstep, DiffSynth): {wrong[:5]}"
    # The corpus reaches every kind of change the cleaning makes.
    changed = {p: g for p, g in zip(prompts, got) if g != p}
    assert got[0] == wan_negative_prompt().replace("，", ",")  # Wan's default negative prompt
    assert len(changed) > 4000, len(changed)


def test_a_broken_input_line_is_one_error():
    r = subprocess.run([str(flowstep_bin()), "clean-prompts"], input='"ok"\nnot json\n', capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "stdin line 2: not a JSON string" in r.stderr, r.stderr


def test_mojibake_is_not_repaired():
    """The documented gap: ftfy's mojibake repair (fix_encoding) is not ported, so text that
    was decoded in the wrong encoding is tokenized as it is, where DiffSynth repairs it."""
    mojibake = ["sÃ³", "voilÃ le travail"]
    assert [diffsynth_clean(p) for p in mojibake] == ["só", "voilà le travail"]
    assert flowstep_clean(mojibake) == mojibake
