"""Stage 2 objectives: the PPO-style clipped surrogate beside REINFORCE (train/objectives.py)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfimprove.config import load_config
from selfimprove.errors import ConfigError
from selfimprove.evaluate import evaluate
from selfimprove.train.improve import improve
from selfimprove.train.objectives import (OBJECTIVES, advantages, clipped_surrogate_loss, kl_to_reference, minibatches,
                                          normalized_advantages, update_epochs)
from selfimprove.train.sft import sft_checkpoint

from conftest import quick_config


def _grad(loss_fn, logp):
    logp = logp.clone().requires_grad_(True)
    loss_fn(logp).backward()
    return logp.grad


def test_at_ratio_one_the_clipped_loss_has_the_reinforce_gradient():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(32, generator=gen) - 3.0
    adv = torch.randn(32, generator=gen)
    ppo = _grad(lambda lp: clipped_surrogate_loss(lp, logp.detach(), adv, 0.2)[0], logp)
    reinforce = _grad(lambda lp: -(adv * lp).mean(), logp)
    torch.testing.assert_close(ppo, reinforce)
    loss, stats = clipped_surrogate_loss(logp, logp, adv, 0.2)
    assert float(loss) == pytest.approx(float(-adv.mean()), abs=1e-6)
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-7)


def test_the_loss_clips_when_the_ratio_leaves_the_trust_region():
    eps = 0.2
    old = torch.zeros(4)
    # ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, +1, -1
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    grad = _grad(lambda lp: clipped_surrogate_loss(lp, old, adv, eps)[0], logp)
    # pushed past the region in the favoured direction: clipped, no gradient
    assert grad[0] == 0.0 and grad[3] == 0.0
    # moved the wrong way: the pessimistic (unclipped) term keeps pulling back
    assert grad[1] == pytest.approx(1.5 / 4) and grad[2] == pytest.approx(-0.5 / 4)
    loss, stats = clipped_surrogate_loss(logp, old, adv, eps)
    expected = -np.mean([(1 + eps) * 1.0, 1.5 * -1.0, 0.5 * 1.0, (1 - eps) * -1.0])
    assert float(loss) == pytest.approx(expected)
    assert stats["clip_fraction"] == 1.0 and stats["approx_kl"] > 0
    # inside the region nothing is clipped: the gradient is ratio * advantage / N
    inside = torch.log(torch.tensor([1.1, 0.9]))
    g = _grad(lambda lp: clipped_surrogate_loss(lp, torch.zeros(2), torch.tensor([1.0, -1.0]), eps)[0], inside)
    torch.testing.assert_close(g, torch.tensor([-1.1 / 2, 0.9 / 2]))


def test_normalized_advantages_keep_order_with_zero_mean_unit_spread():
    returns = torch.tensor([3.0, -1.0, 0.5, 10.0, 2.0])
    adv = normalized_advantages(returns)
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-6) and float(adv.std()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(torch.argsort(adv), torch.argsort(returns))


def test_objective_config_defaults_and_clear_errors():
    assert load_config("pointmass").improve.objective == "reinforce"
    assert update_epochs(load_config("pointmass").improve) == 1
    ppo = load_config("pointmass", ["improve.objective=ppo"]).improve
    assert ppo.ppo_clip == 0.2 and update_epochs(ppo) == 4
    assert update_epochs(load_config("pointmass", ["improve.objective=ppo", "improve.epochs=2"]).improve) == 2
    for override, word in [("improve.objective=trpo", "improve.objective"), ("improve.ppo_clip=0", "improve.ppo_clip"),
                           ("improve.ppo_clip=1.5", "improve.ppo_clip"), ("improve.epochs=0", "improve.epochs")]:
        with pytest.raises(ConfigError, match=word):
            load_config("pointmass", [override])


def _ppo_run(trained, tmp_path, name):
    config = quick_config(tmp_path, f"name={name}", f"data.path={trained.dataset_path}", "improve.objective=ppo",
                          "improve.iterations=15", "improve.steps_per_iteration=2048", "improve.eval_every=0")
    path = improve(config, sft_checkpoint(trained), progress=False)
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    return config, path, [r for r in records if r.get("stage") == "improve" and r["iteration"] >= 1]


def test_ppo_self_improvement_is_deterministic_and_beats_sft(trained_quick, tmp_path):
    config, path, history = _ppo_run(trained_quick, tmp_path, "ppo_a")
    _, path_b, history_b = _ppo_run(trained_quick, tmp_path, "ppo_b")
    drop = ("collect_s", "update_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in history_b]
    weights, weights_b = load_file(path / "model.safetensors"), load_file(path_b / "model.safetensors")
    assert all(torch.equal(weights[k], weights_b[k]) for k in weights)
    steps = np.diff([0] + [r["env_steps"] for r in history])
    assert [r["updates"] for r in history] == [4 * -(-int(n) // 64) for n in steps]  # 4 epochs of minibatches of 64
    assert all(0.0 <= r["clip_fraction"] <= 1.0 for r in history)
    # the learner saw only its detector: detected success rises over practice ...
    detected = [r["detected_success_rate"] for r in history]
    assert np.mean(detected[-3:]) > detected[0]
    # ... and the simulator's success (evaluation only) beats the SFT policy on fixed eval boards
    sft_eval = evaluate(config, sft_checkpoint(trained_quick), episodes=200)
    ppo_eval = evaluate(config, path, episodes=200)
    assert ppo_eval["success_rate"] > sft_eval["success_rate"]
    assert ppo_eval["mean_episode_length"] < sft_eval["mean_episode_length"]


def test_minibatches_of_a_fixed_size_and_zero_means_the_whole_batch():
    order = torch.arange(130)
    assert [len(p) for p in minibatches(order, 64)] == [64, 64, 2]
    assert torch.equal(torch.cat(minibatches(order, 64)), order)
    assert [len(p) for p in minibatches(order, 0)] == [130]
    assert [len(p) for p in minibatches(torch.arange(10), 64)] == [10]


def test_kl_to_reference_is_zero_at_the_reference_and_pulls_towards_it():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(8, 2, 5, generator=gen)
    assert float(kl_to_reference(ref, ref, 1.0)) == pytest.approx(0.0, abs=1e-6)
    logits = (ref + torch.randn(8, 2, 5, generator=gen)).requires_grad_(True)
    kl = kl_to_reference(logits, ref, 1.0)
    assert float(kl.detach()) > 0
    kl.backward()
    with torch.no_grad():
        assert float(kl_to_reference(logits - 0.5 * logits.grad, ref, 1.0)) < float(kl)


def test_advantages_and_the_loss_registry():
    returns = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(advantages(returns, "return"), returns)
    assert float(advantages(returns, "normalized").mean()) == pytest.approx(0.0, abs=1e-6)
    assert set(OBJECTIVES) == {"reinforce", "ppo", "ppo_token"}
    assert OBJECTIVES["ppo"][1] and OBJECTIVES["ppo_token"][1] and not OBJECTIVES["reinforce"][1]
    assert float(advantages(returns, "gae").mean()) == pytest.approx(0.0, abs=1e-6)  # the critic's, normalised


def test_per_token_ppo_clips_each_token_and_matches_ppo_for_one_token():
    """ppo_token: a 4-token action whose tokens each moved a little keeps its gradient where the whole
    action's ratio (their product) has left the clip range; with one token it is ppo."""
    from selfimprove.config import ImproveConfig
    from selfimprove.train.objectives import ppo_loss, ppo_token_loss

    cfg = ImproveConfig(objective="ppo_token", ppo_clip=0.2)
    old = torch.zeros(3, 4)
    new = torch.full((3, 4), 0.1, requires_grad=True)  # each token's ratio e^0.1 = 1.105: inside the range
    adv = torch.tensor([1.0, -0.5, 2.0])
    whole, whole_stats = ppo_loss(new.sum(-1), old.sum(-1), adv, cfg)  # e^0.4 = 1.49: clipped
    per_token, token_stats = ppo_token_loss(new, old, adv, cfg)
    assert whole_stats["clip_fraction"] == 1.0 and token_stats["clip_fraction"] == 0.0
    per_token.backward()
    assert new.grad.abs().min() > 0  # every token still learns
    one = torch.randn(5, 1, requires_grad=True)
    a, _ = ppo_token_loss(one, torch.zeros(5, 1), adv.repeat(2)[:5], cfg)
    b, _ = ppo_loss(one.squeeze(-1), torch.zeros(5), adv.repeat(2)[:5], cfg)
    assert float(a.detach()) == pytest.approx(float(b.detach()))


def test_conservative_learner_stays_near_the_sft_policy(trained_quick, tmp_path):
    """Full-batch steps on normalised advantages with a KL anchor: with a constant reward (no
    information) the policy moves less from SFT than the paper's minibatch REINFORCE does."""
    def run(name, *overrides):
        config = quick_config(tmp_path, f"name={name}", f"data.path={trained_quick.dataset_path}",
                              "improve.iterations=4", "improve.eval_every=0", "improve.guard=false",
                              "improve.reward=constant", *overrides)
        path = improve(config, sft_checkpoint(trained_quick), progress=False)
        records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
        moved = sum(float((a - b).abs().sum()) for a, b in zip(load_file(path / "model.safetensors").values(),
                    load_file(sft_checkpoint(trained_quick) / "model.safetensors").values()))
        return moved, [r for r in records if r.get("stage") == "improve" and r["iteration"] >= 1]

    paper, _ = run("paper")
    anchored, history = run("anchored", "improve.minibatch_size=0", "improve.advantage=normalized",
                            "improve.kl_coef=1.0", "improve.reward_clip=5")
    assert all(r["updates"] == 1 and "kl_ref" in r for r in history)
    assert anchored < paper / 5


def test_reward_model_baseline_uses_no_frame_after_the_action_and_removes_the_frame_noise():
    from selfimprove.reward import discounted_returns, reward_model_baseline

    rng = np.random.default_rng(0)
    d = np.linspace(60, 0, 31).astype(np.float32) + rng.normal(0, 8, 31).astype(np.float32)  # noisy progress
    b = reward_model_baseline(d, 0.9)
    assert b.shape == (30,)
    later = d.copy()
    later[11:] += 100.0  # what happens after the action at t = 10 ...
    assert np.array_equal(reward_model_baseline(later, 0.9)[:11], b[:11])  # ... never reaches its baseline
    returns = discounted_returns(d[:-1] - d[1:], 0.9)
    # R_t - b_t no longer holds d(o_t)'s own noise: the frame noise moves R_t one for one, R_t - b_t far less
    noise = d - np.linspace(60, 0, 31)
    corr = lambda x: float(np.corrcoef(x, noise[:-1])[0, 1])  # noqa: E731
    assert corr(returns) > 0.5 and abs(corr(returns - b)) < corr(returns) / 2
    with pytest.raises(ConfigError, match="improve.baseline"):
        load_config("pointmass-quick", ["improve.baseline=critic"])


def test_positive_only_ignores_the_rows_with_no_positive_advantage():
    """improve.positive_only: a batch's failures change nothing; the update is the one on its successes."""
    import dataclasses

    from selfimprove.data.episode import Episode
    from selfimprove.domains import make_env, model_spec
    from selfimprove.model.inputs import from_episodes
    from selfimprove.model.policy import EmbodiedModel
    from selfimprove.train.objectives import policy_update

    config = load_config("pointmass-quick", ["improve.positive_only=true", "improve.minibatch_size=0",
                                             "improve.epochs=1", "improve.kl_coef=0"])
    spec = model_spec(config, make_env(config))
    rng = np.random.default_rng(0)
    episodes = [Episode(observations={"state": rng.normal(size=(6, 6)).astype(np.float32)},
                        actions=rng.uniform(-1, 1, size=(5, 2)).astype(np.float32), instruction="reach") for _ in range(4)]
    advantage = torch.tensor([1.0, -1.0, 0.5, 0.0]).repeat_interleave(5)

    def update(eps, adv, cfg):
        torch.manual_seed(0)
        policy = EmbodiedModel(spec)
        source, acting = from_episodes(eps, spec)
        tokens = torch.as_tensor(policy.tokenizer.tokenize(np.concatenate([e.actions for e in eps])))
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        stats = policy_update(policy, optimizer, source, acting, tokens, adv, cfg, torch.Generator().manual_seed(0))
        return policy.state_dict(), stats

    everything, stats = update(episodes, advantage, config)
    successes, _ = update([episodes[0], episodes[2]], torch.tensor([1.0, 0.5]).repeat_interleave(5),
                          dataclasses.replace(config, improve=dataclasses.replace(config.improve, positive_only=False)))
    assert stats["positive_rows"] == 10
    assert all(torch.allclose(everything[k], successes[k], atol=1e-6) for k in everything)


def test_per_token_ppo_practises_on_the_real_loop(trained_quick, tmp_path):
    config = quick_config(tmp_path, "name=token", f"data.path={trained_quick.dataset_path}", "improve.iterations=2",
                          "improve.eval_every=0", "improve.guard=false", "improve.objective=ppo_token",
                          "improve.advantage=normalized", "improve.kl_coef=0.1")
    path = improve(config, sft_checkpoint(trained_quick), progress=False)
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    history = [r for r in records if r.get("stage") == "improve" and r["iteration"] >= 1]
    assert len(history) == 2 and all(r["updates"] > 0 and 0 <= r["clip_fraction"] <= 1 for r in history)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(load_file(path / "model.safetensors").values(),
                load_file(sft_checkpoint(trained_quick) / "model.safetensors").values()))
    assert moved > 0
