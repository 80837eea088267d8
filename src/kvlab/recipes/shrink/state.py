"""A shrink run's state: what each stage found, kept in ``OUT/shrink_state.json`` after every stage
so that ``--resume`` skips the stages that are done (training stages resume from their own
checkpoints), and what ``results.json`` is made of."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.io.atomic import write_json
from kvlab.recipes.shrink.candidates import Candidate

STATE = "shrink_state.json"


@dataclass
class OriginalScore:
    """The original model's numbers, and how long scoring one model takes (the planner's input)."""

    name: str
    kv_bytes: int
    proxy_ppl: float
    val: dict
    eval_s: float
    proxy_s: float
    # passkey retrieval and task scores (kvlab.eval.suite.TrustSuite.score), and the seconds they took
    suite: dict = field(default_factory=dict)
    suite_s: float = 0.0


@dataclass
class RankedCandidate:
    """A candidate and its held-out proxy perplexity right after conversion (α = 0), over
    ``proxy_tokens`` tokens (the first half of the proxy windows, or all of them for the best few);
    ``speed``: its decode step against the original's, where measured (a SpeedRatio's fields)."""

    name: str
    family: str
    kind: str
    change: dict
    kv_bytes: int
    precision: str | None
    alpha0_proxy_ppl: float
    proxy_tokens: int
    speed: dict | None = None

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.name, self.family, self.kind, self.change, self.kv_bytes, self.precision)


@dataclass
class RecoveryPlan:
    """Steps of (attention transfer, distillation) per chosen candidate; with a time budget, the
    measured step times and each candidate's deadline (``timing``; None with a token budget)."""

    tokens_per_step: int
    steps: list[tuple[int, int]]
    timing: dict | None


@dataclass
class RecoveredCandidate:
    """A candidate after recovery: its scores, its recovery curve ``(tokens, proxy perplexity)`` and
    where each training stage ended (``stages``)."""

    name: str
    family: str
    kind: str
    change: dict
    kv_bytes: int
    precision: str | None
    proxy_ppl: float
    refit_proxy_ppl: float | None
    refit_used: bool
    val: dict
    curve: list
    stages: list[dict]
    train_tokens: int
    # decode step against the original's by context (a SpeedRatio's fields), "512", "2048", ...
    speed: dict[str, dict] = field(default_factory=dict)
    # against the original on the validation text (kvlab.eval.fidelity.Fidelity's fields)
    fidelity: dict = field(default_factory=dict)
    # against the original on what no stage saw (kvlab.eval.suite.TrustSuite.score)
    suite: dict = field(default_factory=dict)
    # a structure with a quantized cache: its fidelity on the validation text with a float cache
    structure_alone: dict | None = None


@dataclass
class ShrinkState:
    """Each stage's result, None (or empty) until the stage has run."""

    config: dict
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))
    elapsed_s: float = 0.0
    original: OriginalScore | None = None
    ranking: list[RankedCandidate] | None = None
    chosen: list[str] | None = None              # the names recovered, in ranking order
    plan: RecoveryPlan | None = None
    recovered: dict[str, RecoveredCandidate] = field(default_factory=dict)
    best: str | None = None
    hf_export: str | None = None
    hf_note: str | None = None
    serving: dict | None = None                  # the chosen model's serving gain (a ServingGain's fields)
    target_output: str | None = None             # the target runtime's format, relative to the run directory
    target_notes: list[str] = field(default_factory=list)   # what its user must know beyond the file
    keys_balanced: bool = False        # integer caches hold the keys balanced (kvlab.convert.balance)
    validation_text: str = "the built-in validation split"    # what the final numbers are measured on
    refused: dict[str, str] = field(default_factory=dict)   # candidates the target does not run -> why

    @classmethod
    def load(cls, path: Path) -> "ShrinkState":
        raw = json.loads(path.read_text())
        state = cls(**{k: v for k, v in raw.items() if k not in ("original", "ranking", "plan", "recovered")})
        if raw.get("original") is not None:
            state.original = OriginalScore(**_known(OriginalScore, raw["original"]))
        if raw.get("ranking") is not None:
            state.ranking = [RankedCandidate(**r) for r in raw["ranking"]]
        if raw.get("plan") is not None:
            plan = raw["plan"]
            state.plan = RecoveryPlan(plan["tokens_per_step"], [tuple(s) for s in plan["steps"]], plan["timing"])
        state.recovered = {name: RecoveredCandidate(**_known(RecoveredCandidate, r))
                           for name, r in raw.get("recovered", {}).items()}
        return state

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    def results(self, model_ref: str, budget: int, elapsed_s: float) -> dict[str, Any]:
        """``results.json``: the run's settings, the original's and every candidate's numbers, the plan and
        what was chosen and exported."""
        def public(entry) -> dict:
            return dataclasses.asdict(entry)

        return {"model": model_ref, "budget_bytes_per_token": budget, "original": public(self.original),
                "ranking": [dataclasses.asdict(r) for r in self.ranking], "chosen": self.chosen,
                "recovered": [public(r) for r in self.recovered.values()],
                "best": self.best, "plan": dataclasses.asdict(self.plan), "hf_export": self.hf_export,
                "hf_note": self.hf_note, "serving": self.serving, "target": self.config.get("target", "kvlab"),
                "target_output": self.target_output, "target_notes": self.target_notes, "refused": self.refused,
                "keys_balanced": self.keys_balanced, "validation_text": self.validation_text,
                "config": self.config,
                "elapsed_s": elapsed_s}


def _known(cls, raw: dict) -> dict:
    """``raw``'s fields that ``cls`` has: a state written before a field was dropped still loads (the
    chat replies of runs before the trust suite), and one written before a field was added takes its
    default."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}
