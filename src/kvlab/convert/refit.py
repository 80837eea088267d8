"""Output refit: after any conversion, each layer's attention output projection is refitted in
closed form so that the converted model's attention, run on its *own* hidden states, reproduces
the original model's attention output on the original's hidden states at the same tokens.

Why: a conversion fits each layer's keys and values to the original's on the original's
activations, layer by layer and independently. In the converted model the errors of earlier layers
change what later layers see, and the attention weights themselves change (a merged or compressed
key moves every score), neither of which a K/V fit can see. The output projection ``W_o`` is the
last linear map of the layer, so for fixed everything-before-it the best ``W_o`` is a least-squares
problem: with ``u`` the converted layer's per-head attention output (``o_proj``'s input) and
``y`` the original layer's attention output,

    W_o = E[y ûᵀ] (E[û ûᵀ] + λI)⁻¹        (û = (u, 1) when ``o_proj`` has a bias)

over the calibration tokens. Layers are refitted in order, each on hidden states that already flow
through the refitted layers before it, so later layers correct what earlier ones left (the
sequential order of GPTQ/OBC, applied to attention outputs). It is the closed-form optimum of
layer-wise attention transfer restricted to ``o_proj``, and a cheap start for it.

**The ridge λ is chosen per layer on held-out calibration rows** (every 4th row): the weakest of
:data:`RIDGES` whose held-out error is within 25 % of the best, or no refit at all for a layer whose
converted projection predicts the held-out rows better. Why not one fixed λ: on SmolLM2 converted to
GQA-3-CLA2 the consumer layers' attention outputs are nearly degenerate, and the least-squares fit
with λ = 1e-6 (relative) over-fits them — validation perplexity 2,689 → 117,004, though every
layer's calibration error fell. Taking the best held-out λ per layer (mostly 0.1–1) fixes that
(115) but over-shrinks where nothing over-fits (MLA 160+32: 24.8 against 21.5 at λ = 1e-6); the
weakest ridge within 25 % of the best keeps both (CLA2 66.3, MLA 21.4).

Measured on SmolLM2-135M at α = 0 (validation perplexity on 8,192 tokens at 1,024 context; 8,192
calibration tokens; ~50 s on 2 cores): MLA 160+32 (KV/2) 28.5 → 21.4, GQA-3-CLA2 calibrated (KV/2)
2,689 → 66.3, MQA calibrated (KV/3) 115 → 60.4. 32,768 calibration tokens did not do
better (MLA 21.9). Regressing the K/V inputs onto the converted model's hidden states as well (a
GPTQ-style input correction) made it worse (MLA 31.1 without the output refit, 23.4 with it), and a
target that also cancels the residual stream's drift over-fits (25.5); so only ``W_o`` is refitted,
to the original's attention output.

Works for every attention kind whose layers end in ``o_proj`` (GQA/MQA/CLA consumers included, MLA),
and for any student with the teacher's depth, width and norms outside attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlab.errors import ConfigError
from kvlab.io.provenance import record_step

# Ridge strengths tried, relative to the mean diagonal of ``ûᵀû``; each layer takes the weakest whose
# held-out error is within TOLERANCE of the best (or keeps its converted projection if that does
# better on the held-out rows).
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TOLERANCE = 0.25
HOLD_OUT_EVERY = 4          # every 4th calibration row is held out to choose the ridge


def _held_out_rows(batches: list[torch.Tensor]) -> torch.Tensor:
    """A flag per calibration token (flattened as the fit's rows are): is its row held out? None
    are when there are fewer than two rows."""
    rows = sum(t.shape[0] for t in batches)
    flags = [(r % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1) and rows > 1 for r in range(rows)]
    T = batches[0].shape[1]
    return torch.tensor(flags).repeat_interleave(T)


def _ridge_fit(u: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W`` minimising ``‖u Wᵀ − y‖² + λ‖W‖²`` with ``λ = ridge · mean(diag(uᵀu))``."""
    gram = u.T @ u
    lam = ridge * gram.diagonal().mean().clamp_min(1e-30)
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                              u.T @ y).T


def _choose_ridge(u_fit, y_fit, u_held, y_held, old) -> tuple[float | None, dict]:
    """The weakest ridge (from :data:`RIDGES`) whose fit on the fitting rows predicts the held-out
    rows within TOLERANCE of the best, or None when the converted projection ``old`` predicts them
    better; with the held-out relative errors of each. Without held-out rows: the smallest ridge."""
    if not len(u_held):
        return RIDGES[0], {}
    gram = u_fit.T @ u_fit
    vals, vecs = torch.linalg.eigh(gram)
    proj = (y_fit.T @ u_fit) @ vecs                       # C Q
    u_q = u_held @ vecs
    scale = float((y_held ** 2).sum().clamp_min(1e-30))
    errors = {"kept": float(((u_held @ old.T - y_held) ** 2).sum()) / scale}
    mean_diag = gram.diagonal().mean().clamp_min(1e-30)
    for r in RIDGES:
        pred = u_q @ (proj / (vals + r * mean_diag)).T     # u_h Q (Λ + λ)⁻¹ Qᵀ Cᵀ
        errors[r] = float(((pred - y_held) ** 2).sum()) / scale
    best = min(errors[r] for r in RIDGES)
    # The weakest ridge within TOLERANCE of the best held-out error: per-layer held-out error favours
    # strong shrinkage more than the model's perplexity does (module docstring).
    chosen = next(r for r in RIDGES if errors[r] <= best * (1 + TOLERANCE))
    return (None if errors["kept"] <= errors[chosen] else chosen), errors


def _entry(model, tokens: torch.Tensor):
    """The first block's input and the context of a plain call on ``tokens``, as ``hidden_states``
    builds them, so that blocks can be run one at a time."""
    x = model.embed_tokens(tokens)
    ctx = model.plain_context(tokens, x.dtype)
    if model.cfg.pos == "learned":
        x = x + model.embed_positions(ctx.q_pos)
    return x, ctx


def _check_pair(teacher, student) -> None:
    t, s = teacher.cfg, student.cfg
    if (t.n_layer, t.d_model, t.vocab_size) != (s.n_layer, s.d_model, s.vocab_size):
        raise ConfigError(f"output refit needs a student of the teacher's shape; teacher has {t.n_layer} layers of "
                          f"width {t.d_model}, student {s.n_layer} of width {s.d_model}")
    if teacher.prompt_adapter is not None or student.prompt_adapter is not None:
        raise ConfigError("output refit works on plain models; refit before adding a prompt adapter")
    if any(not hasattr(b.self_attn, "o_proj") for b in student.layers):
        raise ConfigError("output refit needs attention layers that end in an o_proj")


@torch.no_grad()
def refit_outputs(teacher, student, calibration, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Refit every ``student`` layer's ``o_proj`` in place (see the module docstring) on the
    calibration token batches ``(B, T)``. Returns per layer: the relative error of the attention
    output on those tokens before and after (``"before"``, ``"after"``), the ridge chosen (``"ridge"``;
    None where the converted projection was kept) and the held-out errors it was chosen by
    (``"held_out"``)."""
    _check_pair(teacher, student)
    batches = [t.to(teacher.device) for t in calibration]
    if not batches:
        raise ConfigError("output refit needs at least one batch of calibration tokens")
    was = teacher.training, student.training
    teacher.eval()
    student.eval()
    try:
        h_t, t_ctx = map(list, zip(*(_entry(teacher, t) for t in batches)))
        h_s, s_ctx = map(list, zip(*(_entry(student, t) for t in batches)))
        report = {"before": [], "after": [], "ridge": [], "held_out": []}
        held = _held_out_rows(batches).to(teacher.device)
        for i, (tb, sb) in enumerate(zip(teacher.layers, student.layers)):
            o = sb.self_attn.o_proj
            # The teacher's block advances its stream and yields the target (its attention output) in
            # one pass; the student's attention runs once before its refit, its block once after.
            targets: list[torch.Tensor] = []
            inputs: list[torch.Tensor] = []
            hooks = [tb.self_attn.register_forward_hook(
                         lambda m, args, out, into=targets: into.append(out.flatten(0, 1).double())),
                     o.register_forward_pre_hook(
                         lambda m, args, into=inputs: into.append(args[0].flatten(0, 1).double()))]
            try:
                h_t = [tb(h, c) for h, c in zip(h_t, t_ctx)]
                for hs, sc in zip(h_s, s_ctx):
                    sb.self_attn(sb.input_layernorm(hs), sc)
            finally:
                for hook in hooks:
                    hook.remove()
            y, u = torch.cat(targets), torch.cat(inputs)
            if o.bias is not None:
                u = torch.cat([u, torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)], 1)
            old = o.weight.double() if o.bias is None else torch.cat([o.weight.double(), o.bias.double()[:, None]], 1)
            ridge, errors = _choose_ridge(u[~held], y[~held], u[held], y[held], old)
            scale = (y ** 2).sum().clamp_min(1e-30)
            report["before"].append(float(((u @ old.T - y) ** 2).sum() / scale))
            report["ridge"].append(ridge)
            report["held_out"].append(errors)
            if ridge is None:        # the converted projection predicts held-out text better: keep it
                report["after"].append(report["before"][-1])
            else:
                new = _ridge_fit(u, y, ridge)
                report["after"].append(float(((u @ new.T - y) ** 2).sum() / scale))
                if o.bias is None:
                    o.weight.copy_(new.to(o.weight.dtype))
                else:
                    o.weight.copy_(new[:, :-1].to(o.weight.dtype))
                    o.bias.copy_(new[:, -1].to(o.bias.dtype))
            h_s = [sb(h, c) for h, c in zip(h_s, s_ctx)]          # through the refitted layer
            if progress is not None:
                progress(i + 1, len(student.layers))
    finally:
        teacher.train(was[0])
        student.train(was[1])
    record_step(student, "refit", what="o_proj", calibration_tokens=sum(int(t.numel()) for t in batches),
                attention_error_before=[round(e, 6) for e in report["before"]],
                attention_error_after=[round(e, 6) for e in report["after"]],
                ridge=["kept" if r is None else r for r in report["ridge"]])
    return report
