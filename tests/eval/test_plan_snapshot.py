"""The planner and ``kvlab info`` give the numbers the previous release gave, for every preset and
variant (the fixture was written by kvlab 0.1.0, before cache accounting went through the kinds)."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from kvlab import PRESETS, ModelConfig
from kvlab.cli import main
from kvlab.eval.plan import plan, plan_as_dicts

SNAPSHOT = json.loads((Path(__file__).parent.parent / "fixtures" / "plan_info_v0_1.json").read_text())


def test_the_snapshot_covers_every_preset():
    """Every decoder-only preset (the encoder–decoder presets came later: tests/models/test_encoder_decoder.py)."""
    assert sorted(SNAPSHOT) == sorted(n for n in PRESETS if not ModelConfig.from_preset(n).is_encoder_decoder)


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_plan_and_info_are_unchanged(name):
    cfg = ModelConfig.from_preset(name)
    for key, rows in SNAPSHOT[name]["plan"].items():
        memory, context, dtype = key.split("-")
        assert plan_as_dicts(plan(cfg, int(memory), int(context), dtype)) == rows, key
    for key, info in SNAPSHOT[name]["info"].items():
        kv, cla = key.removeprefix("kv").split("-cla")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["info", "--preset", name, "--n-kv-head", kv, "--cla", cla, "--json"]) == 0
        new = json.loads(out.getvalue())
        assert {k: new[k] for k in info} == info, key       # every old field, same value (new fields may join)
        assert new["cache_bytes_per_sequence"] == 0 and {a["kind"] for a in new["attention"]} == {"gqa"}
