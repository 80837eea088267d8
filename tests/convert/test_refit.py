"""Output refit (kvlab.convert.refit): each layer's o_proj is the least-squares fit, in order, of the
original's attention output from the converted model's own attention on its own hidden states."""

import copy

import pytest
import torch

from kvlab import ConfigError
from kvlab.convert import convert, convert_to_mla
from kvlab.convert.refit import refit_outputs
from kvlab.training import evaluate_loss

from conftest import make_model

CALIB = [torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _captured(model, tokens_list, where: str):
    """Per layer, the float64 rows of what every layer's o_proj reads (``where="in"``) or what its
    attention returns (``"out"``), from ordinary full forward passes over ``tokens_list``."""
    rows = {i: [] for i in range(model.cfg.n_layer)}
    hooks = []
    for i, block in enumerate(model.layers):
        if where == "in":
            hooks.append(block.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=i: rows[i].append(a[0].flatten(0, 1).double())))
        else:
            hooks.append(block.self_attn.register_forward_hook(
                lambda m, a, out, i=i: rows[i].append(out.flatten(0, 1).double())))
    with torch.no_grad():
        for t in tokens_list:
            model(t)
    for h in hooks:
        h.remove()
    return {i: torch.cat(r) for i, r in rows.items()}


@pytest.mark.parametrize("variant", [dict(), dict(o_bias=True, qkv_bias=True), dict(pos="learned"),
                                     dict(block="parallel")])
def test_an_unconverted_copy_stays_the_same_model(variant):
    """Nothing to correct: the refit finds the original projections again (up to float32 noise in
    the directions the calibration text barely excites), so the model computes the same logits."""
    teacher = make_model(**variant)
    student = copy.deepcopy(teacher)
    report = refit_outputs(teacher, student, CALIB)
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(student(tokens), teacher(tokens), rtol=1e-4, atol=3e-4)
    assert max(report["after"]) < 1e-7 and max(report["before"]) < 1e-9


def test_each_layer_is_the_least_squares_fit_on_the_refitted_layers_before_it(trained_mha):
    """Reference: after the refit, full forward passes of the *refitted* student give each layer's
    o_proj input, full passes of the teacher its attention output; ``lstsq`` in float64 on those
    must give the refitted weights (so layer i was fitted with layers < i already refitted). The
    objective is ridge regression, solved here as the augmented least-squares problem
    ``[u; √λ·I] W = [y; 0]`` rather than through the normal equations."""
    teacher, _, calib = trained_mha
    student = convert(teacher, n_kv_head=1, method="mean")
    converted = [b.self_attn.o_proj.weight.clone() for b in student.layers]
    report = refit_outputs(teacher, student, calib)
    u = _captured(student, calib, "in")
    y = _captured(teacher, calib, "out")
    assert any(r is not None for r in report["ridge"])
    for i, block in enumerate(student.layers):
        if report["ridge"][i] is None:          # kept: it predicted the held-out rows best
            assert torch.equal(block.self_attn.o_proj.weight, converted[i])
            continue
        n = u[i].shape[1]
        lam = report["ridge"][i] * (u[i] ** 2).sum(0).mean()
        a = torch.cat([u[i], lam.sqrt() * torch.eye(n, dtype=torch.float64)])
        b = torch.cat([y[i], torch.zeros(n, y[i].shape[1], dtype=torch.float64)])
        expected = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(block.self_attn.o_proj.weight.double(), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("conversion", ["mqa-calibrated", "cla2-calibrated", "mla"])
def test_refit_brings_converted_trained_models_closer_to_the_original(trained_mha, conversion):
    model, val, calib = trained_mha
    if conversion == "mla":
        student = convert_to_mla(model, kv_lora_rank=16, qk_rope_head_dim=8, calibration=calib)
    else:
        change = dict(n_kv_head=1) if conversion.startswith("mqa") else dict(cla=2)
        student = convert(model, method="calibrated", calibration=calib, **change)
    original = evaluate_loss(model, val, 4, "cpu")
    before = evaluate_loss(student, val, 4, "cpu")
    report = refit_outputs(model, student, calib)
    after = evaluate_loss(student, val, 4, "cpu")
    assert all(a <= b + 1e-9 for a, b in zip(report["after"], report["before"])), report
    assert after - original < 0.8 * (before - original), (original, before, after)


def test_a_student_of_another_shape_is_refused():
    with pytest.raises(ConfigError, match="student of the teacher's shape"):
        refit_outputs(make_model(), make_model(n_layer=3), CALIB)
    with pytest.raises(ConfigError, match="at least one batch"):
        refit_outputs(make_model(), make_model(), [])


def test_the_ridge_is_chosen_on_held_out_rows():
    """The eigen-decomposed shortcut gives the held-out errors of direct ridge solves; the choice is the
    weakest within TOLERANCE of the best of them, or None ("kept") when the converted projection
    predicts better."""
    from kvlab.convert.refit import RIDGES, TOLERANCE, _choose_ridge, _ridge_fit

    g = torch.Generator().manual_seed(0)
    u = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = u @ w.T + 3 * torch.randn(200, 5, generator=g, dtype=torch.float64)      # noisy: a ridge can help
    fit, held = slice(0, 40), slice(40, 200)
    ridge, errors = _choose_ridge(u[fit], y[fit], u[held], y[held], torch.zeros(5, 12, dtype=torch.float64))
    scale = (y[held] ** 2).sum()
    for r in RIDGES:
        direct = ((u[held] @ _ridge_fit(u[fit], y[fit], r).T - y[held]) ** 2).sum() / scale
        assert errors[r] == pytest.approx(float(direct), rel=1e-8)
    best = min(errors[r] for r in RIDGES)       # the weakest ridge within TOLERANCE of the best
    assert ridge == next(r for r in RIDGES if errors[r] <= best * (1 + TOLERANCE))
    assert errors[ridge] > best or ridge == min(RIDGES, key=errors.get)
    kept, _ = _choose_ridge(u[fit], y[fit], u[held], y[held], w)     # the true map beats every fit
    assert kept is None
