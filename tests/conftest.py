import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from selfimprove.config import RunConfig, load_config  # noqa: E402


def quick_config(tmp_path, *overrides: str) -> RunConfig:
    """The tiny point-mass preset writing under ``tmp_path``."""
    return load_config("pointmass-quick", [f"runs_dir={tmp_path}", *overrides])


@pytest.fixture(scope="session")
def trained_quick(tmp_path_factory):
    """A quick run with demos and an SFT checkpoint, shared by tests that only read it."""
    from selfimprove.data.collect import collect_demos
    from selfimprove.train.sft import sft

    config = quick_config(tmp_path_factory.mktemp("runs"), "name=shared")
    collect_demos(config, progress=False)
    sft(config, progress=False)
    return config


def quick_tabletop():
    """The tiny tabletop preset with 12-step episodes, and its model spec."""
    from selfimprove.domains import make_env, model_spec

    config = load_config("language-table-quick", ["env.max_episode_steps=12"])
    return config, model_spec(config, make_env(config))


def practice_episodes(config, spec, reward, weights, shared: bool) -> list:
    """Four episodes of the policy ``weights`` on 3 tabletop robots scored by ``reward`` (fixed seeds),
    with the conv pass shared between policy and reward model or not; sorted by start seed."""
    import torch

    from selfimprove.domains import make_env
    from selfimprove.fleet.local import LocalFleet, seed_stream

    fleet = LocalFleet(lambda: make_env(config, terminate_on_success=False), spec, 3, reward)
    fleet.set_weights(weights, 0)
    assert fleet.shared  # the policy's own SFT weights: its convs can be shared
    fleet.shared = shared
    episodes = fleet.collect(weights, 0, seeds=seed_stream(5), n_episodes=4, generator=torch.Generator().manual_seed(1))
    return sorted(episodes, key=lambda e: e.meta["seed"])
