"""The score head (kvlab.models.heads) reads the decoder's hidden states: a reward at each row's
last real token (``sequence_scores``), a value at every position (PPO's ``policy_and_values``), on
any attention kind."""

import pytest
import torch

from kvlab import ConfigError
from kvlab.models.heads import add_score_head
from kvlab.training.rl import policy_and_values

from conftest import VARIANTS, make_model


@pytest.mark.parametrize("variant", ["gqa", "mqa-cla2", "hybrid-windows", "mla", "linear-elu"])
def test_reward_reads_the_last_real_token_of_each_row(variant):
    model = add_score_head(make_model(**VARIANTS[variant]), seed=0)
    tokens = torch.randint(1, 256, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0                     # left padding
    mask[2, 5:] = 0                     # right padding
    rewards = model.sequence_scores(tokens, attention_mask=mask)
    assert rewards.shape == (3, 1)
    for b, last in enumerate([7, 7, 4]):
        row = tokens[b:b + 1, :last + 1][:, mask[b, :last + 1].bool()]
        alone = model.hidden_states(row)[0, -1] @ model.score.weight[0]    # the row by itself, unpadded
        torch.testing.assert_close(rewards[b, 0], alone, rtol=1e-5, atol=1e-5)


def test_the_value_of_each_completion_token_is_read_at_the_state_before_it():
    model = add_score_head(make_model(), n_outputs=1, seed=0)
    gen = torch.Generator().manual_seed(1)
    prompt, completion = torch.randint(1, 256, (2, 3), generator=gen), torch.randint(1, 256, (2, 4), generator=gen)
    ones = torch.ones_like
    _, values = policy_and_values(model, prompt, ones(prompt), completion, ones(completion))
    assert values.shape == (2, 4)
    for t in range(4):        # the value before token t sees the prompt and the t tokens before it only
        seen = torch.cat([prompt, completion[:, :t]], 1)
        torch.testing.assert_close(values[:, t], model.score(model.hidden_states(seen)[:, -1])[:, 0],
                                   rtol=1e-5, atol=1e-5)


def test_a_model_keeps_its_head_and_a_model_without_one_says_how_to_add_it():
    model = add_score_head(make_model(), seed=0)
    head = model.score
    assert add_score_head(model).score is head and model.cfg.score_outputs == 1
    with pytest.raises(ConfigError, match="add_score_head"):
        make_model().sequence_scores(torch.ones(1, 2, dtype=torch.long))
