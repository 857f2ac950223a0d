"""Action decoders: each is a proper distribution over token vectors, samples what it scores, learns
what it should, and checkpoints made before the choice existed still load and act the same."""

import itertools
import json

import pytest
import torch

from selfimprove.config import load_config
from selfimprove.errors import CheckpointError, ConfigError
from selfimprove.model.checkpoint import load_checkpoint, save_checkpoint
from selfimprove.model.decoders import DECODERS, make_decoder
from selfimprove.model.policy import EmbodiedModel, ModelSpec

from conftest import quick_config

BINS, DIM, FEATURES = 4, 3, 8


def every_action() -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(BINS), repeat=DIM)))


def log_probs(decoder, h: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(tokens | h) [N] for one feature row ``h`` [1, F] and many token vectors."""
    hs = h.expand(len(tokens), -1)
    logits = decoder.logits(hs, tokens) / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, decoder.targets(tokens).unsqueeze(-1)).squeeze(-1).sum(-1)


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_each_decoder_is_a_distribution_over_whole_actions_and_samples_it(name, temperature):
    torch.manual_seed(0)
    decoder = make_decoder(name, FEATURES, DIM, BINS, 16)
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0, 1.0)  # far from uniform, so a wrong factorisation shows
        h = torch.randn(1, FEATURES)
        actions = every_action()
        probs = log_probs(decoder, h, actions, temperature).exp()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
        n = 20000
        samples = decoder.sample(h.expand(n, -1), temperature, torch.Generator().manual_seed(1))
        assert samples.shape == (n, DIM) and samples.min() >= 0 and samples.max() < BINS
        index = (samples * BINS ** torch.arange(DIM - 1, -1, -1)).sum(-1)
        freq = torch.bincount(index, minlength=BINS ** DIM).float() / n
        assert (freq - probs).abs().max().item() < 0.015  # ~4 standard errors at the largest p
        greedy = decoder.sample(h, 0.0)
        if name == "autoregressive":  # greedy: the most likely token of each dimension, given the ones before
            prefix = greedy[0]
            for k in range(DIM):
                cond = [a for a in actions if torch.equal(a[:k], prefix[:k])]
                best = max(cond, key=lambda a: log_probs(decoder, h, a[None]).item())
                assert best[k] == prefix[k]
        elif name == "joint":  # the most likely action
            assert log_probs(decoder, h, greedy, temperature).exp().item() == pytest.approx(probs.max().item())
        else:  # the most likely bin of each dimension
            assert torch.equal(greedy, decoder.logits(h).argmax(-1))


def _fit(name: str, actions: torch.Tensor, steps: int = 300) -> torch.nn.Module:
    torch.manual_seed(0)
    decoder = make_decoder(name, FEATURES, 2, BINS, 32)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    h = torch.ones(len(actions), FEATURES)
    for _ in range(steps):
        optimizer.zero_grad()
        (-log_probs_batch(decoder, h, actions).mean()).backward()
        optimizer.step()
    return decoder


def log_probs_batch(decoder, h, tokens):
    logp = torch.log_softmax(decoder.logits(h, tokens), -1)
    return logp.gather(-1, decoder.targets(tokens).unsqueeze(-1)).squeeze(-1).sum(-1)


@pytest.mark.parametrize("name", ["autoregressive", "joint"])
def test_coupled_dimensions_are_imitated_where_independent_ones_mix_modes(name):
    # the demonstrator moves along a diagonal: (0, 0) or (3, 3), never a mixture
    actions = torch.tensor([[0, 0], [3, 3]]).repeat(256, 1)
    n = 4000
    h = torch.ones(n, FEATURES)
    coupled = _fit(name, actions).sample(h, 1.0, torch.Generator().manual_seed(0))
    mixed = _fit("independent", actions).sample(h, 1.0, torch.Generator().manual_seed(0))
    assert (coupled[:, 0] == coupled[:, 1]).float().mean() > 0.97
    assert (mixed[:, 0] == mixed[:, 1]).float().mean() < 0.6  # each dimension on its own: half the draws mix


def spec(**kw) -> ModelSpec:
    base = dict(domain="pointmass", obs_shapes={"state": [6]}, action_low=[-1, -1], action_high=[1, 1],
                action_bins=11, max_steps=20, hidden=32, layers=2)
    return ModelSpec(**{**base, **kw})


def test_a_checkpoint_made_before_the_decoders_loads_and_acts_as_before(tmp_path):
    torch.manual_seed(0)
    model = EmbodiedModel(spec())
    save_checkpoint(model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck/config.json").read_text())
    del config["spec"]["action_decoder"]  # what an older release wrote
    (tmp_path / "ck/config.json").write_text(json.dumps(config))
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.spec.action_decoder == "independent" and "action_head.weight" in loaded.state_dict()
    obs = {"state": torch.randn(64, 6)}
    for t in (1.0, 0.0):
        a = model.act(obs, t, torch.Generator().manual_seed(3))
        b = loaded.act(obs, t, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["autoregressive", "joint"])
def test_round_trip_of_each_decoder(tmp_path, name):
    model = EmbodiedModel(spec(action_decoder=name))
    save_checkpoint(model, tmp_path / "ck")
    loaded, _ = load_checkpoint(tmp_path / "ck")
    obs, tokens = {"state": torch.randn(5, 6)}, torch.randint(0, 11, (5, 2))
    assert torch.equal(model(obs, tokens)[0], loaded(obs, tokens)[0])
    assert torch.equal(model.act(obs, 1.0, torch.Generator().manual_seed(0)),
                       loaded.act(obs, 1.0, torch.Generator().manual_seed(0)))


def test_bad_decoders_in_a_checkpoint_are_refused_before_any_work(tmp_path):
    save_checkpoint(EmbodiedModel(spec()), tmp_path / "ck")
    config = json.loads((tmp_path / "ck/config.json").read_text())
    config["spec"]["action_decoder"] = "diffusion"
    (tmp_path / "ck/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown action decoder 'diffusion'; known"):
        load_checkpoint(tmp_path / "ck")
    # weights of the independent head under a config that says joint: the token counts differ
    config["spec"]["action_decoder"] = "joint"
    (tmp_path / "ck/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"action_head.weight: file \(22, 32\) vs model \(121, 32\)"):
        load_checkpoint(tmp_path / "ck")
    config["spec"].update(action_decoder="joint", action_bins=200)
    (tmp_path / "ck/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"200 \*\* 2 = 40000 classes"):
        load_checkpoint(tmp_path / "ck")


def test_the_config_refuses_unknown_and_oversized_decoders(tmp_path):
    with pytest.raises(ConfigError, match="model.action_decoder must be one of 'independent'"):
        load_config("pointmass-quick", ["model.action_decoder=transformer"])
    from selfimprove.domains import make_env, model_spec

    config = quick_config(tmp_path, "model.action_decoder=joint", "model.action_bins=101")
    env = make_env(config)
    with pytest.raises(ConfigError, match="101 \\*\\* 2 = 10201 classes"):
        model_spec(config, env)
    env.close()


def test_the_whole_method_runs_with_the_autoregressive_decoder(tmp_path):
    """SFT, evaluation, PPO with the KL to the SFT policy, and the report, on the tiny point mass."""
    from selfimprove.pipeline import run_pipeline

    config = quick_config(tmp_path, "model.action_decoder=autoregressive", "improve.iterations=2",
                          "improve.eval_every=2", "improve.objective=ppo", "improve.kl_coef=0.1")
    summary = run_pipeline(config, progress=False)
    assert 0 <= summary["improve"]["success_rate"] <= 1
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if r["stage"] == "improve" and "kl_ref" in r]
    assert updates and all(r["kl_ref"] >= 0 and r["approx_kl"] >= 0 for r in updates)
    loaded, _ = load_checkpoint(config.run_dir / "checkpoints" / "improve")
    assert loaded.spec.action_decoder == "autoregressive"
