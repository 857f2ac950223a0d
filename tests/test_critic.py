"""The learned value baseline of Stage 2 (improve.advantage = "gae", train/critic.py)."""

import json

import numpy as np
import pytest
import torch

from selfimprove.config import ImproveConfig, load_config
from selfimprove.errors import ConfigError
from selfimprove.model.checkpoint import load_checkpoint, load_train_state
from selfimprove.reward import discounted_returns
from selfimprove.train.critic import ValueBaseline, gae
from selfimprove.train.improve import improve
from selfimprove.train.sft import sft_checkpoint

from conftest import quick_config


def test_gae_is_the_discounted_sum_of_td_errors_with_success_ending_the_episode():
    r, v = np.array([1.0, 0.0, 2.0]), np.array([0.5, 1.0, 2.0, 3.0])
    g, lam = 0.9, 0.5
    deltas = r + g * v[1:] - v[:-1]  # a timeout: V(o_T) bootstraps
    by_hand = [deltas[0] + g * lam * deltas[1] + (g * lam) ** 2 * deltas[2], deltas[1] + g * lam * deltas[2], deltas[2]]
    np.testing.assert_allclose(gae(r, v, terminal=False, gamma=g, lam=lam), by_hand, rtol=1e-6)
    ended = gae(r, v, terminal=True, gamma=g, lam=lam)  # a success: nothing follows o_T
    np.testing.assert_allclose(ended[-1], 2.0 - 2.0, atol=1e-6)
    # lambda = 1 with V = 0 is the Monte Carlo return; lambda = 0 the one-step TD error
    np.testing.assert_allclose(gae(r, np.zeros(4), True, g, 1.0), discounted_returns(r, g), rtol=1e-6)
    np.testing.assert_allclose(gae(r, v, False, g, 0.0), deltas, rtol=1e-6)
    with pytest.raises(ValueError, match="4 values for 4 rewards"):
        gae(np.zeros(4), v, False, g, lam)


def test_the_critic_learns_state_values_and_its_state_round_trips():
    cfg = ImproveConfig(advantage="gae", value_lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(512, 16, generator=gen)
    targets = features[:, 0] * 2.0 + features[:, 1]  # how good a state is, readable from its features
    value = ValueBaseline(16, cfg, seed=0)
    first = value.fit(features, targets, gen, epochs=30, minibatch=64)
    second = value.fit(features, targets, gen, epochs=1, minibatch=64)
    assert first["value_explained_variance"] < 0.2 < 0.9 < second["value_explained_variance"]
    tensors, meta = value.state()
    again = ValueBaseline(16, cfg, seed=1)  # another init, then the saved state
    again.load(tensors, json.loads(json.dumps(meta)))
    with torch.no_grad():
        assert torch.equal(again.critic(features), value.critic(features))
    a, b = value.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_gae_practice_resumes_bit_for_bit_with_its_critic(trained_quick, tmp_path):
    """The point mass on the real loop: the critic is fitted each batch, saved with the run, and a
    stopped run resumed ends where the straight run does (policy, critic and records)."""
    def run(name, iterations, resume=False):
        config = quick_config(tmp_path, f"name={name}", f"data.path={trained_quick.dataset_path}",
                              f"improve.iterations={iterations}", "improve.eval_every=0", "improve.guard=false",
                              "improve.advantage=gae", "improve.objective=ppo", "improve.reward=true_success")
        final = improve(config, sft_checkpoint(trained_quick), resume=resume, progress=False)
        lines = (config.run_dir / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if r.get("stage") == "improve" and r["iteration"] >= 1]
        return final, records

    straight, records = run("straight", 3)
    assert len(records) == 3 and all(np.isfinite(r["value_loss"]) for r in records)
    run("stopped", 2)
    resumed, again = run("stopped", 3, resume=True)
    keep = ("value_loss", "value_explained_variance", "loss", "mean_return")
    assert [{k: r[k] for k in keep} for r in again] == [{k: r[k] for k in keep} for r in records]
    for a, b in ((load_checkpoint(resumed)[0].state_dict(), load_checkpoint(straight)[0].state_dict()),
                 (load_train_state(resumed)[0], load_train_state(straight)[0])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("critic.") for k in load_train_state(resumed)[0])


def test_bad_gae_settings_are_refused():
    with pytest.raises(ConfigError, match="gae_lambda must be in"):
        load_config("pointmass-quick", ["improve.advantage=gae", "improve.gae_lambda=1.5"])
    with pytest.raises(ConfigError, match="has its own baseline"):
        load_config("pointmass-quick", ["improve.advantage=gae", "improve.baseline=reward_model"])
    with pytest.raises(ConfigError, match="advantage must be one of"):
        load_config("pointmass-quick", ["improve.advantage=critic"])


def test_the_critic_reads_the_same_features_from_the_fleet_as_from_the_frames():
    """With improve.train = "fusion" the fleet hands over its fusion inputs; the critic's features
    from them are the frozen trunk's features of the frames themselves."""
    import dataclasses

    from selfimprove.domains import make_env, model_spec
    from selfimprove.fleet.local import LocalFleet, seed_stream
    from selfimprove.model.policy import EmbodiedModel
    from selfimprove.reward import StepsToGoReward
    from selfimprove.train.critic import trunk_features

    config = load_config("language-table-quick", ["env.max_episode_steps=6"])
    spec = model_spec(config, make_env(config))
    torch.manual_seed(0)
    model = EmbodiedModel(spec)
    fleet = LocalFleet(lambda: make_env(config, terminate_on_success=False), spec, 2,
                       StepsToGoReward(model, threshold=-1.0))
    episodes = fleet.collect(model.state_dict(), 0, seeds=seed_stream(3), n_episodes=3,
                             generator=torch.Generator().manual_seed(0))
    assert all(e.fused is not None for e in episodes)
    from_fleet = trunk_features(model, episodes)
    from_frames = trunk_features(model, [dataclasses.replace(e, fused=None) for e in episodes])
    assert from_fleet.shape == (sum(e.length + 1 for e in episodes), model.encoder.out_dim)
    torch.testing.assert_close(from_fleet, from_frames, rtol=1e-5, atol=1e-5)
