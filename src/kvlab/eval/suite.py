"""What kvlab measures of a model beside its perplexity on one text, each against its original: the
fidelity on off-domain text (:mod:`kvlab.data.offdomain`: per set, the perplexity ratio, KL and top-1
agreement), passkey retrieval (:mod:`kvlab.eval.passkey`) and two tasks built from shipped text
(:mod:`kvlab.eval.cloze`: next-line multiple choice and identifier recall).

One :class:`TrustSuite` is built once per run (its text, trials and items fixed by the tokenizer, the
model's context and a seed) and scores the original and every shrunk model alike, each reading
through its own cache format, so their numbers sit side by side in ``kvlab shrink``'s report and in
``kvlab eval --original``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvlab.data.corpus import Document
from kvlab.data.offdomain import available_sets, offdomain_documents
from kvlab.errors import ConfigError
from kvlab.eval.cloze import ClozeItem, next_line_accuracy, next_line_items, recall_accuracy, recall_items
from kvlab.eval.fidelity import fidelity
from kvlab.eval.passkey import PasskeyTrial, passkey_retrieval, passkey_trials
from kvlab.eval.perplexity import evaluate

TASKS = ("next-line", "recall")


@dataclass
class TrustSuite:
    domains: dict[str, list[Document]]          # off-domain set -> its passages
    passkey: list[PasskeyTrial]
    tasks: dict[str, list[ClozeItem]]           # "next-line" / "recall" -> items
    seq_len: int                                # windows the off-domain text is scored in
    domain_tokens: int                          # tokens scored of each off-domain set

    def score(self, model, tokenizer, *, original=None, kv_quant=None, backend: str | None = None,
              domains: bool = True) -> dict:
        """``model``'s numbers (its cache in ``kv_quant``): on each off-domain set its fidelity to
        ``original`` (without one: its perplexity, an :class:`~kvlab.eval.perplexity.EvalResult`'s fields);
        passkey retrieval and the task scores; and the seconds each part took. ``domains=False`` leaves the
        off-domain sets out."""
        out: dict = {"seconds": {}}
        t = time.perf_counter()
        options = dict(seq_len=self.seq_len, kv_quant=kv_quant, max_tokens=self.domain_tokens, backend=backend)
        if self.domains and domains:
            out["domains"] = {name: (fidelity(original, model, tokenizer, docs, **options) if original is not None
                                     else evaluate(model, tokenizer, docs, progress=False, **options)).to_dict()
                              for name, docs in self.domains.items()}
            out["seconds"]["domains"] = time.perf_counter() - t
        if self.passkey:
            t = time.perf_counter()
            out["passkey"] = passkey_retrieval(model, self.passkey, kv_quant=kv_quant, backend=backend).to_dict()
            out["seconds"]["passkey"] = time.perf_counter() - t
        scorers = {"next-line": next_line_accuracy, "recall": recall_accuracy}
        if self.tasks:
            t = time.perf_counter()
            out["tasks"] = {name: scorers[name](model, tokenizer, items, kv_quant=kv_quant, backend=backend).to_dict()
                            for name, items in self.tasks.items() if items}
            out["seconds"]["tasks"] = time.perf_counter() - t
        return out


# The shrink report's passkey depths: three of the five kvlab eval --passkey uses (a trial costs a
# forward pass over its whole prompt).
SHRINK_DEPTHS = (0.1, 0.5, 0.9)
def build_suite(tokenizer, max_seq_len: int, *, domain_tokens: int = 1024, passkey_lengths: Sequence[int] = (),
                passkey_depths: Sequence[float] = SHRINK_DEPTHS, passkey_trials_per_cell: int = 1,
                task_items: int = 32, tasks: Sequence[str] = TASKS, seq_len: int = 1024, seed: int = 0) -> TrustSuite:
    """The suite (module docstring): every off-domain set the machine has, ``domain_tokens`` tokens of
    each (0: none); passkey trials at ``passkey_lengths`` (each at most ``max_seq_len``); ``task_items``
    items of each of ``tasks``, built from the off-domain text (0: none)."""
    names = available_sets() if domain_tokens or task_items else []
    task_text = 0 if not task_items else max(2048, 64 * task_items)     # about a passage per 8 items and set
    text = {name: offdomain_documents(name, tokenizer, max(domain_tokens, task_text)) for name in names}
    domains = text if domain_tokens else {}        # scoring stops at domain_tokens of each (max_tokens)
    every = [d for docs in text.values() for d in docs]
    makers = {"next-line": next_line_items, "recall": recall_items}
    unknown = [t for t in tasks if t not in makers]
    if unknown:
        raise ConfigError(f"no built-in task {unknown[0]!r}; kvlab's tasks are {', '.join(TASKS)}")
    tasks = {name: makers[name](every, task_items, seed) for name in tasks} if task_items else {}
    lengths = [n for n in passkey_lengths if n <= max_seq_len]
    trials = passkey_trials(tokenizer, lengths, passkey_depths, passkey_trials_per_cell, seed) if lengths else []
    return TrustSuite(domains, trials, tasks, min(seq_len, max_seq_len), domain_tokens)


def suite_summary(scores: dict, original: dict | None = None) -> str:
    """One log line's worth of a :meth:`TrustSuite.score` result (with the original's beside it)."""
    parts = []
    if scores.get("domains") and all("perplexity_ratio" in f for f in scores["domains"].values()):
        ratios = [f["perplexity_ratio"] for f in scores["domains"].values()]
        agree = [f["top1_agreement"] for f in scores["domains"].values()]
        parts.append(f"off-domain perplexity ratio {min(ratios):.3f}-{max(ratios):.3f} (top-1 agreement "
                     f"{min(agree):.0%}-{max(agree):.0%}, {len(ratios)} sets)")
    for key, label, field in (("passkey", "passkey", "accuracy"), ("tasks", "next-line", "next-line"),
                              ("tasks", "recall", "recall")):
        value = scores.get(key, {}) if key == "passkey" else scores.get(key, {}).get(field)
        if not value:
            continue
        ours = value["accuracy"]
        theirs = ((original or {}).get("passkey") if key == "passkey"
                  else (original or {}).get("tasks", {}).get(field))
        parts.append(f"{label} {ours:.0%}" + (f" (original {theirs['accuracy']:.0%})" if theirs else ""))
    return "".join(", " + p for p in parts)
