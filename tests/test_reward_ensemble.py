"""The pessimistic reward ensemble (``improve.reward_ensemble``): d is the largest of the members'."""

import json

import numpy as np
import pytest
import torch

from conftest import practice_episodes, quick_config, quick_tabletop
from selfimprove.config import load_config
from selfimprove.domains import make_env
from selfimprove.errors import CheckpointError, ConfigError, RunStateError
from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.model.inputs import from_episodes
from selfimprove.model.policy import EmbodiedModel
from selfimprove.reward import StepsToGoReward, load_ensemble
from selfimprove.train.improve import improve
from selfimprove.train.sft import sft_checkpoint


def test_an_ensemble_predicts_the_largest_d_of_its_members_shared_trunk_or_not():
    config, spec = quick_tabletop()
    torch.manual_seed(0)
    policy, second, third = EmbodiedModel(spec), EmbodiedModel(spec), EmbodiedModel(spec)
    weights = policy.state_dict()
    with torch.no_grad():  # one member far from the goal, one near it: the ensemble follows the first
        for member, cls in ((second, -1), (third, 0)):
            [m for m in member.stg_head.modules() if isinstance(m, torch.nn.Linear)][-1].bias[cls] += 3.0

    def collect(shared: bool, ensemble: list[EmbodiedModel]) -> list:
        first = EmbodiedModel(spec)
        first.load_state_dict(weights)  # the policy's own SFT checkpoint: its convs can be shared
        return practice_episodes(config, spec, StepsToGoReward(first, threshold=-1.0, ensemble=ensemble), weights, shared)

    alone = collect(True, [])
    together, apart = collect(True, [second, third]), collect(False, [second, third])
    for one, a, b in zip(alone, together, apart):
        assert np.array_equal(one.actions, a.actions) and np.array_equal(a.actions, b.actions)  # same policy
        np.testing.assert_allclose(a.stg, b.stg, rtol=1e-5, atol=1e-4)
        assert np.all(a.stg >= one.stg - 1e-4) and np.any(a.stg > one.stg + 1e-3)  # pessimistic
        # and exactly the largest member's d, frame by frame
        single = [StepsToGoReward(m, 0.0) for m in (policy, second, third)]
        source, _ = from_episodes([a], spec)
        per_member = np.stack([r.steps_to_go_of(source) for r in single])
        np.testing.assert_allclose(a.stg, per_member.max(0), rtol=1e-5, atol=1e-4)


def test_members_of_another_spec_are_refused_before_any_work(trained_quick, tmp_path):
    config, spec = quick_tabletop()
    first = EmbodiedModel(spec)
    other = EmbodiedModel(type(spec)(**{**spec.to_dict(), "hidden": spec.hidden * 2}))
    with pytest.raises(ValueError, match="spec of the first"):
        StepsToGoReward(first, 0.0, ensemble=[other])
    with pytest.raises(CheckpointError, match="language-table"):  # a point-mass checkpoint for a tabletop model
        load_ensemble([sft_checkpoint(trained_quick)], first)
    with pytest.raises(CheckpointError):
        load_ensemble([tmp_path / "no-such-checkpoint"], first)


def test_ensemble_config_errors_are_clear():
    with pytest.raises(ConfigError, match="guard"):
        load_config("pointmass-quick", ['improve.reward_ensemble=["runs/a/checkpoints/sft"]', "improve.guard=true"])
    with pytest.raises(ConfigError, match="reward_ensemble"):
        load_config("pointmass-quick", ['improve.reward_ensemble="runs/a/checkpoints/sft"', "improve.guard=false"])


def test_stage2_with_an_ensemble_calibrates_s_on_its_d_and_records_it(trained_quick, tmp_path):
    """Two copies of one checkpoint predict what the checkpoint alone does: the same s, a run that
    records both members, and episodes that end as the lone model's would."""
    sft = sft_checkpoint(trained_quick)
    common = [f"data.path={trained_quick.dataset_path}", "improve.iterations=1", "improve.eval_every=0",
              "improve.guard=false", "improve.steps_per_iteration=64"]
    alone = quick_config(tmp_path, "name=alone", *common)
    improve(alone, sft_path=sft, progress=False)
    pair = quick_config(tmp_path, "name=pair", *common, f'improve.reward_ensemble=["{sft}"]')
    improve(pair, sft_path=sft, progress=False)
    one, two = (json.loads((c.run_dir / "detector.json").read_text()) for c in (alone, pair))
    assert two["ensemble_members"] == 2 and one["ensemble_members"] == 1
    assert two["threshold"] == one["threshold"]
    _, meta = load_checkpoint(pair.run_dir / "checkpoints" / "improve")
    assert meta["reward_ensemble"] == [str(sft)] and "reward_ensemble" not in load_checkpoint(
        alone.run_dir / "checkpoints" / "improve")[1]


def test_diagnose_sees_the_ensemble_stage2_would_use(trained_quick, tmp_path):
    """``selfimprove diagnose`` with improve.reward_ensemble measures the ensemble's d: two copies of a
    checkpoint diagnose as the checkpoint alone, and a diagnosis is not mistaken for the other's."""
    import dataclasses

    from selfimprove.diagnose.run import diagnose

    sft = sft_checkpoint(trained_quick)
    alone = diagnose(sft, config=trained_quick, rollouts=4, out=tmp_path / "alone")
    paired = dataclasses.replace(trained_quick, improve=dataclasses.replace(trained_quick.improve,
                                                                            reward_ensemble=[str(sft)]))
    pair = diagnose(sft, config=paired, rollouts=4, out=tmp_path / "pair")
    assert pair["recommended_s"] == alone["recommended_s"]
    assert pair["at_recommended_s"] == alone["at_recommended_s"]
    assert pair["identity"]["settings"]["improve.reward_ensemble"] == [str(sft)]
    with pytest.raises(RunStateError, match="improve.reward_ensemble"):
        diagnose(sft, config=trained_quick, rollouts=4, out=tmp_path / "pair")  # not the ensemble's folder


def test_a_ray_robot_host_rebuilds_every_member_of_the_ensemble():
    """What a Ray actor receives (each member's weights, one spec) makes the same ensemble."""
    pytest.importorskip("ray")
    from selfimprove.fleet.ray import RobotHost, _numpy_weights

    config, spec = quick_tabletop()
    torch.manual_seed(0)
    members = [EmbodiedModel(spec) for _ in range(3)]
    reward = StepsToGoReward(members[0], threshold=-1.0, hold=2, ensemble=members[1:])
    detector = {"threshold": reward.threshold, "hold": reward.hold, "spec": spec.to_dict()}
    host = RobotHost(lambda: make_env(config, terminate_on_success=False), spec, 2, 0,
                     [_numpy_weights(m.state_dict()) for m in reward.members], detector, False, 0)
    rebuilt = host.fleet.reward
    assert len(rebuilt.members) == 3 and rebuilt.hold == 2
    for mine, theirs in zip(reward.members, rebuilt.members):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.state_dict().items())
