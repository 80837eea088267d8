"""Which shared RoPE key an MLA conversion should keep: kvlab's fit against TransMLA's RoRoPE and
FreqFold and a second RoPE head, on SmolLM2-135M before any training (α = 0).

An MLA layer caches one RoPE key shared by every head; a GQA model has one per KV head. What the
shared key loses is measured here alone: every other channel is kept as it was (the position-free
keys and the values are not compressed), so the numbers are the RoPE key's cost, not the latent's.
The model stays in GQA form, which computes the same scores as MLA's absorbed form:

- each KV head's kept pairs are replaced by their reconstruction from the shared key's components
  (``κ_h ≈ Σ_r c_hr z_r``, per pair or per group of pairs), which is what the absorbed queries read;
- every other pair loses its rotation (frequency 0), as MLA's position-free channels do;
- a group of pairs fitted jointly (FreqFold) rotates at one frequency, the geometric mean of its own.

Variants (``--variants``, comma-separated):

- ``exact``: every pair of every head kept (rank 3 per pair): must give the original's perplexity;
- ``per-head``: each head keeps its 16 fastest pairs (rank 3, MHA2MLA's per-head partial RoPE; not
  a shared key: 3 × 32 channels);
- ``kvlab``: the 16 fastest pairs, one shared complex key per pair fitted by
  :func:`kvlab.convert.calibrated._merge_keys` (query-weighted, key energy kept) — what
  ``kvlab convert --mla`` does (``qk_rope_head_dim`` 32);
- ``complex``: the same fit without the query weights or the energy correction;
- ``rorope``: TransMLA's RoRoPE, a real orthogonal mix of the heads per frequency (real PCA,
  unweighted), its first component kept;
- ``freqfold``: the 16 fastest pairs folded two by two (8 frequencies), two components each (32 channels);
- ``freqfold-all``: all 32 pairs folded two by two, one component each (32 channels);
- ``second-head``: the 8 fastest pairs, two components each (32 channels);
- ``second-head-64``: the 16 fastest pairs, two components each (64 channels);
- ``all-pairs-64``: all 32 pairs, one component each (64 channels; transformers' DeepSeek-V3 with
  ``qk_rope_head_dim`` 64 derives these frequencies).

    python benchmarks/mla_rope_key.py [--max-tokens 8192] [--out benchmarks/results/mla_rope_key.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import kvlab
from alpha0_record import write_alpha0_results  # benchmarks/, next to this script
from kvlab.convert.calibrated import EPS, _augmented, _merge_keys, _rotate_query_rows, attention_input_moments
from kvlab.convert.finish import finish_conversion, source_state
from kvlab.data.corpus import builtin_corpus
from kvlab.data.windows import calibration_batches
from kvlab.eval.perplexity import evaluate

VARIANTS = ("exact", "per-head", "kvlab", "complex", "rorope", "freqfold", "freqfold-all", "second-head",
            "second-head-64", "all-pairs-64")


def groups_and_rank(name: str):
    """(groups of pairs fitted jointly, components kept per group, fit) of a variant."""
    single = lambda pairs: [[j] for j in pairs]          # noqa: E731
    return {"exact": (single(range(32)), 3, "complex"), "per-head": (single(range(16)), 3, "complex"),
            "kvlab": (single(range(16)), 1, "kvlab"), "complex": (single(range(16)), 1, "unweighted"),
            "rorope": (single(range(16)), 1, "real"),
            "freqfold": ([[2 * k, 2 * k + 1] for k in range(8)], 2, "complex"),
            "freqfold-all": ([[2 * k, 2 * k + 1] for k in range(16)], 1, "complex"),
            "second-head": (single(range(8)), 2, "complex"), "second-head-64": (single(range(16)), 2, "complex"),
            "all-pairs-64": (single(range(32)), 1, "complex")}[name]


def complex_gram(A: torch.Tensor, B: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``E[conj(κ_a) κ_b]`` of the complex keys ``κ = (A + iB) x̂`` with ``E[x̂ x̂ᵀ] = S``."""
    return (A @ S @ A.T + B @ S @ B.T) + 1j * (A @ S @ B.T - B @ S @ A.T)


def reconstruct(A, B, S, weight, rank: int, fit: str):
    """The keys' rows rebuilt from their top ``rank`` components (in the metric ``weight``): (A', B')."""
    gram = complex_gram(A, B, S)
    if fit in ("real", "unweighted"):      # every head's keys count alike (RoRoPE's choice)
        weight = torch.ones_like(weight)
    if fit == "real":                      # RoRoPE: a real orthogonal mix of the heads
        vecs = torch.linalg.eigh(gram.real)[1].to(torch.complex128)
    else:
        w = weight.to(torch.complex128)
        vecs = torch.linalg.eigh(w.conj().unsqueeze(1) * gram * w.unsqueeze(0))[1]
    V = vecs[:, -rank:]
    w = weight.to(torch.complex128)
    # gram is conj(E[κ κᴴ]): its eigenvectors are the conjugates of the covariance's
    M = torch.diag(1 / w) @ (V.conj() @ V.T) @ torch.diag(w)
    return M.real @ A - M.imag @ B, M.imag @ A + M.real @ B


def converted(base, moments, name: str):
    cfg = base.cfg
    D, H, G, half = cfg.head_dim, cfg.n_kv_head, cfg.q_per_kv, cfg.head_dim // 2
    groups, rank, fit = groups_and_rank(name)
    inv0 = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    inv = torch.zeros(half, dtype=torch.float64)           # pairs in no group lose their rotation
    for g in groups:
        inv[g] = torch.exp(torch.log(inv0[g]).mean())
    state = source_state(base)
    dtype = state["embed_tokens.weight"].dtype
    for i in range(cfg.n_layer):
        S = moments[i, i]
        pre = f"layers.{i}.self_attn"
        wk, wq = _augmented(state, f"{pre}.k_proj"), _augmented(state, f"{pre}.q_proj")

        def query_energy(h: int, j: int) -> float:       # E[|q_pair|²] summed over the KV head's query heads
            rows = [wq[qh * D:(qh + 1) * D] for qh in range(h * G, (h + 1) * G)]
            return sum(float(r[j] @ S @ r[j] + r[half + j] @ S @ r[half + j]) for r in rows)

        if fit == "kvlab":
            pairs = [g[0] for g in groups]
            rows = pairs + [half + j for j in pairs]
            heads = [wk[h * D:(h + 1) * D][rows] for h in range(H)]
            q_energy = torch.tensor([[query_energy(h, j) for j in pairs] for h in range(H)], dtype=torch.float64)
            key_energy = torch.stack([torch.einsum("ij,jk,ik->i", k, S, k) for k in heads])
            key_energy = key_energy[:, :len(pairs)] + key_energy[:, len(pairs):]
            shared, factors = _merge_keys(heads, S, q_energy, key_energy)
            for h in range(H):
                wk[[h * D + r for r in rows]] = _rotate_query_rows(shared, factors[h])
        else:
            for g in groups:
                A = torch.cat([wk[h * D:(h + 1) * D][g] for h in range(H)])
                B = torch.cat([wk[h * D:(h + 1) * D][[half + j for j in g]] for h in range(H)])
                weight = torch.tensor([query_energy(h, j) for h in range(H) for j in g],
                                      dtype=torch.float64).clamp_min(EPS).sqrt()
                re, im = reconstruct(A, B, S, weight, rank, fit)
                for n, (h, j) in enumerate((h, j) for h in range(H) for j in g):
                    wk[h * D + j], wk[h * D + half + j] = re[n], im[n]
        state[f"{pre}.k_proj.weight"] = wk[:, :-1].to(dtype)
    model = finish_conversion(base, cfg, state, {"method": f"rope-key:{name}"})
    model._inv_freq = {torch.device("cpu"): inv.float()}    # the model's RoPE table, read by every layer
    return model, 2 * rank * len(groups)                     # cached RoPE channels per layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results/mla_rope_key.json")
    args = ap.parse_args()
    base = kvlab.load("smollm2-135m")
    docs = builtin_corpus("validation")
    calibration = calibration_batches(base.tokenizer, args.calibration_tokens, seed=0)
    moments = attention_input_moments(base, calibration)
    rows = []
    for name in args.variants.split(","):
        model, channels = converted(base, moments, name)
        with torch.no_grad():
            ppl = evaluate(model, base.tokenizer, docs, seq_len=1024, max_tokens=args.max_tokens,
                           progress=False).perplexity
        rows.append({"variant": name, "rope_channels": channels, "perplexity": ppl})
        print(json.dumps(rows[-1]), flush=True)
    write_alpha0_results(args.out, rows, model="smollm2-135m", docs=docs, max_tokens=args.max_tokens,
                         calibration_tokens=args.calibration_tokens)


if __name__ == "__main__":
    main()
