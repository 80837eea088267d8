"""kvlab models in EleutherAI's lm-evaluation-harness, so that users run the standard suites they know
(HellaSwag, ARC, LAMBADA, …) on any kvlab model, its cache in any format kvlab stores.

``kvlab eval MODEL --tasks hellaswag,arc_easy`` runs them (:func:`run_tasks`); in Python,
``lm_eval.simple_evaluate(model=KvlabLM(model), tasks=[...])``, or, once this module is imported,
``lm_eval.simple_evaluate(model="kvlab", model_args="pretrained=DIR")``. (lm-eval has no plugin hook, so
its own ``lm_eval --model kvlab`` command cannot find a model registered by another package.)

:class:`KvlabLM` is lm-eval's ``TemplateLM``: log-likelihoods of continuations (multiple choice), rolling
log-likelihoods (perplexity tasks) and greedy generation cut at the task's stop strings, each through the
model's own cache format (``kv_quant``). Tasks come from lm-eval's registry, from YAML files under
``include_path`` (a task over local JSONL files runs offline), or as YAML paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from kvlab.errors import ConfigError

try:
    from lm_eval.api.model import TemplateLM
except ImportError:                 # optional: kvlab eval --tasks says how to install it
    TemplateLM = object

_INSTALL = "lm-evaluation-harness is not installed; pip install 'lm_eval>=0.4.9' (or kvlab[eval])"


def require_lm_eval() -> None:
    if TemplateLM is object:
        raise ConfigError(_INSTALL)


class KvlabLM(TemplateLM):
    """A kvlab decoder-only model as an lm-eval model (module docstring). ``pretrained``: a kvlab model
    or anything :func:`kvlab.load` reads (a path, a preset name); ``kv_quant``: its cache format."""

    def __init__(self, pretrained=None, *, kv_quant: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, backend: str | None = None, device: str | None = None, **_):
        require_lm_eval()
        super().__init__()
        if isinstance(pretrained, (str, os.PathLike)):
            import kvlab

            pretrained = kvlab.load(str(pretrained), device=device or "cpu")
        if pretrained is None or pretrained.tokenizer is None:
            raise ConfigError("lm-eval needs a kvlab model with a tokenizer (model_args=pretrained=DIR)")
        if pretrained.cfg.is_encoder_decoder:
            raise ConfigError("lm-eval's tasks score decoder-only models; this model is an encoder–decoder")
        self.model, self.tok = pretrained.eval(), pretrained.tokenizer
        self.kv_quant = None if kv_quant in (None, "none") else kv_quant
        self.batch_size = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.max_length = int(max_length or pretrained.cfg.max_seq_len)
        self.backend = backend

    # ------------------------------------------------------------------ TemplateLM's hooks
    @property
    def eot_token_id(self) -> int:
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.model.cfg.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no EOS token; lm-eval needs one to start an empty context")
        return eos

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=True)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), whether greedy decoding gives the continuation)`` per request
        ``((context, continuation), context tokens, continuation tokens)``; the left of a row longer than
        the model's context is dropped, as lm-eval's HF model does."""
        from kvlab.eval.cloze import continuation_logprobs

        rows = []
        for _, context, continuation in requests:
            if len(continuation) >= self.max_length:
                raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the model's context "
                                  f"of {self.max_length}")
            ids = (list(context) + list(continuation))[-self.max_length:]
            rows.append((ids, len(ids) - len(continuation), list(continuation)))
        out = []
        for (_, _, cont), logp in continuation_logprobs(self.model, rows, self.batch_size, self.kv_quant,
                                                        self.backend):
            target = torch.tensor(cont)
            out.append((float(logp[torch.arange(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The total log-likelihood of each text, in disjoint windows of the model's context (lm-eval's
        rolling windows, each predicting its tokens once, the first after the prefix token)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
        return out

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampled where a task asks for ``do_sample`` with a temperature), cut at
        the first of the task's stop strings."""
        from kvlab.inference.generation import generate

        out = []
        for context, kwargs in [r.args for r in requests]:
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kwargs.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-(self.max_length - n_new):] or [self.prefix_token_id]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            new = generate(self.model, [prompt], n_new, temperature=temperature, seed=0,
                           stop_tokens=[self.eot_token_id], backend=self.backend, kv_quant=self.kv_quant)[0]
            text = self.tok_decode([t for t in new if t != self.eot_token_id])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def run_tasks(model, tasks: Sequence[str], *, include_path: str | None = None, limit: int | None = None,
              num_fewshot: int | None = None, kv_quant: str | None = None, batch_size: int = 8,
              backend: str | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` on ``model`` for ``tasks`` (registry names or YAML paths; tasks
    defined under ``include_path`` too), offline where the tasks' data is local. Returns lm-eval's
    ``results`` dict: task -> {"acc,none": …, …}."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # lm-eval's own registry takes seconds to index (thousands of tasks): only when a task is not local
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    lm = KvlabLM(model, kv_quant=kv_quant, batch_size=batch_size, backend=backend)
    try:
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False)
    except (KeyError, ValueError) as e:         # lm-eval's own words for an unknown task or bad YAML
        raise ConfigError(f"lm-eval: {e}") from None
    return res["results"]


def _register() -> None:
    """``model="kvlab"`` in lm-eval's Python API (after lm-eval's own models, which it loads only while
    its registry is empty)."""
    if TemplateLM is object:
        return
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import register_model

    try:
        register_model("kvlab")(KvlabLM)
    except (AssertionError, ValueError):        # registered already (the module reloaded)
        pass


_register()
