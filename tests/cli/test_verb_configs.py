"""The thin verbs: ``train``, ``finetune`` and ``generate`` parse their flags into a recipe config
and call one recipe function. The flags' defaults are the config's (one source), so a command line
that gives only what is required builds the config that Python gets from the same few values."""

from __future__ import annotations

import ast
import inspect
import io
import json

import pytest

import kvlab.recipes.finetune
import kvlab.recipes.generate
import kvlab.recipes.pretrain
from kvlab.cli import finetune as finetune_verb
from kvlab.cli import generate as generate_verb
from kvlab.cli import main
from kvlab.cli import train as train_verb
from kvlab.io import save_checkpoint
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.recipes.finetune_config import FinetuneConfig
from kvlab.recipes.generate import GenerateConfig, generate_text
from kvlab.recipes.loading import ModelSource
from kvlab.recipes.pretrain_config import PretrainConfig

from conftest import make_model


def _called_with(monkeypatch, module, name: str, argv: list[str], result) -> object:
    """The config the verb hands to ``module.name`` (replaced by a stub returning ``result``)."""
    seen = []
    monkeypatch.setattr(module, name, lambda cfg, *a, **k: seen.append(cfg) or result)
    assert main(argv) == 0
    (cfg,) = seen
    return cfg


def test_train_builds_the_config_python_gets(monkeypatch, capsys):
    cfg = _called_with(monkeypatch, kvlab.recipes.pretrain, "pretrain",
                       ["train", "--preset", "tiny", "--out", "o", "--max-steps", "3"], {"final": "o/final"})
    assert cfg == PretrainConfig(preset="tiny", out="o", max_steps=3)
    assert json.loads(capsys.readouterr().out) == {"final": "o/final"}


def test_finetune_builds_the_config_python_gets(monkeypatch, capsys):
    summary = {"method": "lora", "objective": "sft", "accuracy_after": {"accuracy": 0.5}, "options": {}}
    cfg = _called_with(monkeypatch, kvlab.recipes.finetune, "run_finetune",
                       ["finetune", "m", "--method", "lora", "--data", "d.jsonl", "--out", "o", "--epochs", "1"],
                       summary)
    assert cfg == FinetuneConfig(source=ModelSource(model="m"), method="lora", data="d.jsonl", out="o", epochs=1.0)
    assert json.loads(capsys.readouterr().out) == {"method": "lora", "objective": "sft", "accuracy_after": 0.5}


def test_generate_builds_the_config_python_gets(monkeypatch, capsys):
    cfg = _called_with(monkeypatch, kvlab.recipes.generate, "generate_text",
                       ["generate", "m", "--prompt-ids", "1,2", "--window", "8"],
                       kvlab.recipes.generate.Generation([[1, 2]], [[3]], None))
    assert cfg == GenerateConfig(source=ModelSource(model="m", window=8), prompt_ids=["1,2"])
    assert capsys.readouterr().out == "[0] 1 2 3\n"


@pytest.mark.parametrize("verb", [train_verb, finetune_verb, generate_verb])
def test_a_verb_parses_and_calls_one_recipe_function(verb):
    run = ast.parse(inspect.getsource(verb.run)).body[0]
    assert run.end_lineno - run.lineno < 20
    recipe_calls = {n.func.id for n in ast.walk(run) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                    and n.func.id in ("pretrain", "run_finetune", "generate_text")}
    assert len(recipe_calls) == 1


@pytest.mark.parametrize("objective, beta, loss_type, generations, iterations", [
    ("sft", 0.1, None, 1, 1),
    ("reward", 0.1, None, 1, 1),
    ("dpo", 0.1, "sigmoid", 1, 1),
    ("grpo", 0.0, "grpo", 8, 1),
    ("ppo", 0.1, None, 1, 4),
])
def test_objective_settings_default_to_the_objective_loss(objective, beta, loss_type, generations, iterations):
    cfg = FinetuneConfig(source=ModelSource(model="m"), method="lora", data="d", out="o", objective=objective)
    assert (cfg.beta_value, cfg.setting("loss_type"), cfg.generations, cfg.iterations) == \
        (beta, loss_type, generations, iterations)
    given = FinetuneConfig(source=ModelSource(model="m"), method="lora", data="d", out="o", objective=objective,
                           beta=0.3, num_generations=2, num_iterations=3)
    assert (given.beta_value, given.generations, given.iterations) == (0.3, 2, 3)


def test_the_help_shows_the_defaults_of_the_losses(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = "".join(capsys.readouterr().out.split())          # argparse wraps lines, at hyphens too
    for shown in ("(default 0.1); grpo: weight of the KL to the adapter-free base (default 0)",
                  "grpo: completions per prompt (default 8); ppo: (default 1)", "default: grpo 1, ppo 4",
                  "each on a shuffled part of the rollouts (default 1)"):
        assert "".join(shown.split()) in text


def test_generate_text_streams_one_prompt_and_returns_every_row(tmp_path):
    model = make_model()
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    source = ModelSource(model=str(tmp_path / "ckpt"))
    written = io.StringIO()
    one = generate_text(GenerateConfig(source=source, prompt=["hi"], max_new_tokens=5, no_stop=True),
                        write=written.write)
    tok = ByteTokenizer()
    assert one.streamed and written.getvalue() == "hi" + tok.decode(one.outputs[0], skip_special_tokens=True) + "\n"
    two = generate_text(GenerateConfig(source=source, prompt=["hi", "ho"], max_new_tokens=5, no_stop=True),
                        write=written.write)
    assert not two.streamed and two.outputs[0] == one.outputs[0] and len(two.lines()) == 2
    assert [r["new_ids"] for r in two.records()] == two.outputs


def test_a_flag_cannot_write_its_default_a_second_time():
    import argparse

    from kvlab.cli.common import config_option

    with pytest.raises(TypeError, match="takes its default and help from the field"):
        config_option(argparse.ArgumentParser(), FinetuneConfig, "lr", type=float, default=1e-3)
