"""``kvlab shrink``: a trained model in, a model with a KV cache N× smaller that keeps its quality out.

The stages (:class:`~kvlab.recipes.shrink.run.ShrinkRun`; each stage's result is kept in
``OUT/shrink_state.json``, so ``resume`` continues where a run stopped, and the training stages
resume from their own checkpoints):

1. **Score the original**: held-out proxy perplexity, validation perplexity, passkey retrieval and the
   next-line and recall tasks (:mod:`~kvlab.recipes.shrink.evaluation`, :mod:`kvlab.eval.suite`).
2. **Enumerate** the wirings that meet the KV budget (bytes per token, bf16), family by family
   (:mod:`~kvlab.recipes.shrink.candidates`): fewer KV heads with the least cross-layer sharing that
   fits; MLA with a shared RoPE key of a quarter, half or three quarters of a head and the rest of the
   budget as the latent; low-rank key and value latents with a fixed key share, and with the channels
   allocated across layers and between keys and values by the loss.
3. **Rank** them at α = 0: each converted with its family's best start — calibrated merging, the MLA
   latent fitted in the loss's metric, PCA of the keys and values plain or weighted by the loss's
   gradient — from one set of calibration moments, and scored on held-out windows of the training split.
4. **Plan** the recovery of the best few within the budget (``tokens``, or ``minutes`` of wall time
   for the whole run, from measured step times: :mod:`~kvlab.recipes.shrink.planning`).
5. **Recover** each: layer-wise attention transfer to the original, then distillation of its logits
   (the original is the frozen teacher); the recovery curve is recorded on the held-out windows.
6. **Evaluate** each recovered candidate as the original was, with its fidelity to the original (KL,
   top-1 agreement) on the validation text and on each off-domain set; the best (lowest held-out proxy
   perplexity) is kept.
7. **Export** the best as a kvlab checkpoint in ``OUT/model`` and, where transformers has its
   architecture, an HF export in ``OUT/hf``.
8. **Report**: ``report.md``, ``results.json``, ``pareto.png`` and ``recovery.png``
   (:mod:`~kvlab.recipes.shrink.report`).

Nothing in ``OUT`` but what this recipe wrote is ever removed; a directory that holds anything
else is refused.
"""

from kvlab.recipes.shrink.candidates import (
    FAMILIES,
    Candidate,
    convert_candidate,
    enumerate_candidates,
    moments_for,
    parse_kv_budget,
)
from kvlab.recipes.shrink.config import ShrinkConfig
from kvlab.recipes.shrink.evaluation import ProxyCurve
from kvlab.recipes.shrink.planning import transfer_fraction
from kvlab.recipes.shrink.run import OUTPUTS, ShrinkRun, run_shrink

__all__ = ["FAMILIES", "OUTPUTS", "Candidate", "ProxyCurve", "ShrinkConfig", "ShrinkRun", "convert_candidate",
           "enumerate_candidates", "moments_for", "parse_kv_budget", "run_shrink", "transfer_fraction"]
