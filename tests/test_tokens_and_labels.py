import numpy as np
import pytest

from selfimprove.model.tokens import ActionTokenizer


def test_tokens_round_trip_exact_on_bin_centres():
    tok = ActionTokenizer([-1, -0.5], [1, 0.5], bins=21)
    tokens = np.stack(np.meshgrid(np.arange(21), np.arange(21)), -1).reshape(-1, 2)
    assert np.array_equal(tok.tokenize(tok.detokenize(tokens)), tokens)


def test_continuous_actions_within_half_a_bin_and_clipped():
    tok = ActionTokenizer([-1, -1], [1, 1], bins=11)
    actions = np.random.default_rng(0).uniform(-1.5, 1.5, size=(1000, 2))
    back = tok.detokenize(tok.tokenize(actions))
    assert np.all(np.abs(back - np.clip(actions, -1, 1)) <= tok.step / 2 + 1e-6)
    assert back.min() >= -1 and back.max() <= 1


def test_out_of_range_tokens_and_bad_bounds_raise():
    tok = ActionTokenizer([-1], [1], bins=5)
    with pytest.raises(ValueError, match="tokens must lie"):
        tok.detokenize(np.array([[5]]))
    with pytest.raises(ValueError, match="low < high"):
        ActionTokenizer([1], [-1], bins=5)

