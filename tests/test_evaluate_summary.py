"""What an evaluation reports beside success: how the failures failed."""

import numpy as np

from selfimprove.data.episode import Episode
from selfimprove.evaluate import STALL_WINDOW, stalled, summarize_episodes


def _episode(actions: np.ndarray, success: bool) -> Episode:
    t = len(actions)
    return Episode(observations={"state": np.zeros((t + 1, 2), np.float32)}, actions=actions.astype(np.float32),
                   instruction="push", true_success=success)


def test_a_failure_that_repeats_a_few_actions_to_the_end_counts_as_stalled():
    rng = np.random.default_rng(0)
    wander = rng.normal(size=(200, 2))
    swing = np.concatenate([wander[:150], np.tile([[0.1, 0.0], [-0.1, 0.0]], (25, 1))])  # two states, back and forth
    push = np.concatenate([wander[:190], np.tile([[0.0, 0.2]], (10, 1))])  # into a wall for the last 10 steps only
    short = np.tile([[0.0, 0.2]], (STALL_WINDOW - 1, 1))
    assert stalled(_episode(swing, False)) and not stalled(_episode(swing, True))
    assert not stalled(_episode(wander, False)) and not stalled(_episode(push, False))
    assert not stalled(_episode(short, False))  # too short to tell
    episodes = [_episode(swing, False), _episode(wander, False), _episode(wander, True), _episode(swing, True)]
    summary = summarize_episodes(episodes)
    assert summary["stalled_rate"] == 0.25 and summary["success_rate"] == 0.5
