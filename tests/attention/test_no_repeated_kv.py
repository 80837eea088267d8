"""DESIGN: attention never materializes repeated K/V. Scan the code paths that touch K/V."""

import re
from pathlib import Path

import kvlab

SRC = Path(kvlab.__file__).parent
FORBIDDEN = re.compile(r"repeat_interleave|\.repeat\(|\.expand\([^()]*(\([^()]*\)[^()]*)*\)\s*\.contiguous\(\)")
KV_PATHS = sorted([*(SRC / "attention").rglob("*.py"), *(SRC / "models").glob("*.py"), *(SRC / "cache").glob("*.py"),
                   SRC / "inference" / "generation.py"])


def offenders(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if FORBIDDEN.search(line)]


def test_detector_catches_the_forbidden_patterns():
    bad = ["k = k.repeat_interleave(4, dim=1)", "v = v.repeat(1, 4, 1, 1)",
           "k = k[:, :, None].expand(B, H, G, T, D).contiguous()", "x = k.expand(a, f(b)).contiguous()"]
    assert offenders("\n".join(bad)) == bad
    assert offenders("q = q.view(B, Hkv, G, T, D)\nout = sdpa(q, k, v, enable_gqa=True)") == []


def test_no_attention_code_path_repeats_k_or_v():
    assert len(KV_PATHS) >= 7
    found = {str(p.relative_to(SRC)): offenders(p.read_text()) for p in KV_PATHS}
    assert {k: v for k, v in found.items() if v} == {}
