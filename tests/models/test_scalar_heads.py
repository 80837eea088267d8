"""Scalar heads read the decoder's hidden states: a reward at each row's last real token, a value
at every position, on any attention kind."""

import pytest
import torch

from kvlab import ScalarHead

from conftest import VARIANTS, make_model


@pytest.mark.parametrize("variant", ["gqa", "mqa-cla2", "hybrid-windows"])
def test_reward_reads_the_last_real_token_of_each_row(variant):
    backbone = make_model(**VARIANTS[variant])
    head = ScalarHead(backbone)
    tokens = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0                     # left padding
    mask[2, 5:] = 0                     # right padding
    rewards = head(tokens, attention_mask=mask)
    assert rewards.shape == (3, 1)
    for b, last in enumerate([7, 7, 4]):
        row = tokens[b:b + 1, :last + 1][:, mask[b, :last + 1].bool()]
        alone = backbone.hidden_states(row)[0, -1] @ head.score.weight[0]    # the row by itself, unpadded
        torch.testing.assert_close(rewards[b, 0], alone, rtol=1e-5, atol=1e-5)


def test_value_head_scores_every_position():
    backbone = make_model()
    head = ScalarHead(backbone, n_outputs=2, per_token=True)
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    values = head(tokens)
    assert values.shape == (2, 6, 2)
    torch.testing.assert_close(values, backbone.hidden_states(tokens) @ head.score.weight.T)
