"""What keeps the steps-to-go reward model honest off the demos: role-aware instructions,
mismatched-instruction negatives with a "never" class, demos that hold the goal."""

import numpy as np
import torch

from selfimprove.config import load_config
from selfimprove.data.collect import demo_episode
from selfimprove.data.store import EpisodeStore, EpisodeWriter
from selfimprove.domains import goal_key_for
from selfimprove.envs.tabletop import tasks
from selfimprove.model.backbones import make_text_encoder
from selfimprove.model.policy import EmbodiedModel, ModelSpec
from selfimprove.reward import MismatchedInstructions
from selfimprove.train.sft import constant_guess_mae, sft_losses, with_negatives


def _role_swap(text: str) -> str:
    task = tasks.parse_instruction(text)
    return tasks.Block2BlockTask(task.target, task.moved, task.verb, task.preposition).instruction


def test_no_block2block_instruction_shares_its_embedding_with_its_role_swap():
    encoder = make_text_encoder("hashed_roles")
    texts = tasks.all_block2block_instructions()
    assert len(texts) == 896
    a = encoder.encode(texts).detach().numpy()
    b = encoder.encode([_role_swap(t) for t in texts]).detach().numpy()
    assert np.abs(a - b).max(axis=1).min() > 1e-4  # every one of the 896 differs from its swap
    # the order-blind predecessor confuses the swaps of same-shape pairs ("red moon" / "blue moon")
    old = make_text_encoder("hashed_bow")
    same = np.abs(old.encode(texts).detach().numpy() - old.encode([_role_swap(t) for t in texts]).detach().numpy())
    assert (same.max(axis=1) < 1e-6).sum() > 0


def test_goal_key_ignores_wording_and_role_but_not_the_pair():
    key = goal_key_for("language-table")
    assert key("push the red moon to the blue cube") == key("slide the blue cube close to the red moon")
    assert key("push the red moon to the blue cube") != key("push the red moon to the green cube")
    assert key("push the red moon to the top left corner") != key("push the red moon to the center")
    assert goal_key_for("pointmass")("Reach  the goal") == "reach the goal"


def test_mismatched_instructions_ask_for_something_else():
    texts = tasks.all_block2block_instructions()[:64]
    mismatched = MismatchedInstructions(texts, goal_key_for("language-table"))
    drawn = mismatched.draw(texts * 4, torch.Generator().manual_seed(0))
    key = goal_key_for("language-table")
    assert all(key(a) != key(b) for a, b in zip(texts * 4, drawn))
    assert len(set(drawn)) > 10


def _tiny_model(never: bool) -> EmbodiedModel:
    spec = ModelSpec(domain="language-table", obs_shapes={"image": [16, 16, 3], "effector": [2]},
                     action_low=[-0.1, -0.1], action_high=[0.1, 0.1], action_bins=5, max_steps=10, hidden=16,
                     layers=1, encoder="film", frames=1, text_encoder="hashed_roles", channels=[4], stg_never=never)
    return EmbodiedModel(spec)


def test_negatives_train_the_never_class_only():
    model = _tiny_model(never=True)
    assert model.never_class == 11 and model.stg_head.out_features == 12 and float(model.stg_values[-1]) == 11
    assert _tiny_model(never=False).never_class is None
    texts = ["push the red moon to the blue cube", "push the green star to the yellow star"]
    obs = {"image": torch.zeros(4, 1, 16, 16, 3, dtype=torch.uint8), "effector": torch.zeros(4, 2),
           "instruction": [texts[0], texts[0], texts[1], texts[1]]}
    tokens, has_action, stg = torch.zeros(4, 2, dtype=torch.long), torch.ones(4, dtype=torch.bool), torch.tensor([3, 0, 5, 1])
    mismatched = MismatchedInstructions(texts, goal_key_for("language-table"))
    obs2, tokens2, has2, stg2 = with_negatives(obs, tokens, has_action, stg, 6, mismatched, model.never_class,
                                               torch.Generator().manual_seed(0))
    assert len(obs2["instruction"]) == 10 and obs2["image"].shape[0] == 10
    assert stg2[4:].tolist() == [11] * 6 and not has2[4:].any() and has2[:4].all()
    assert all(obs2["instruction"][4 + i] != obs["instruction"][i % 4] for i in range(6))
    losses = sft_losses(model, obs2, tokens2, has2, stg2)
    assert 0 < float(losses["never_p"]) < 1 and torch.isfinite(losses["stg"])
    # training on negatives alone raises the never probability of those rows
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = float(losses["never_p"])
    for _ in range(30):
        loss = sft_losses(model, obs2, tokens2, has2, stg2)
        opt.zero_grad()
        (loss["bc"] + loss["stg"]).backward()
        opt.step()
    assert float(sft_losses(model, obs2, tokens2, has2, stg2)["never_p"]) > before + 0.2


def test_reachable_steps_to_go_leaves_the_never_class_out():
    model = _tiny_model(never=True)
    obs = {"image": torch.zeros(3, 1, 16, 16, 3, dtype=torch.uint8), "effector": torch.zeros(3, 2),
           "instruction": ["push the red moon to the blue cube"] * 3}
    with torch.no_grad():
        model.stg_head.weight.zero_()
        model.stg_head.bias.copy_(torch.tensor([0.0] * 11 + [5.0]))  # most mass on "never"
    full, reachable = model.expected_steps_to_go(obs), model.expected_steps_to_go(obs, reachable=True)
    assert torch.all(full > 10) and torch.allclose(reachable, torch.full((3,), 5.0))  # uniform over 0..10
    plain = _tiny_model(never=False)
    assert torch.equal(plain.expected_steps_to_go(obs, reachable=True), plain.expected_steps_to_go(obs))


def test_held_out_steps_to_go_error_is_reported_with_and_without_the_never_class():
    """Mass on "never" counts max_steps + 1 steps in d: the MAE without it and the mass itself say how
    much of the error is that class, and a constant guess says what the MAE must beat."""
    model = _tiny_model(never=True)
    obs = {"image": torch.zeros(2, 1, 16, 16, 3, dtype=torch.uint8), "effector": torch.zeros(2, 2),
           "instruction": ["push the red moon to the blue cube"] * 2}
    with torch.no_grad():
        model.stg_head.weight.zero_()
        model.stg_head.bias.copy_(torch.tensor([-30.0] * 11 + [0.0]))
        model.stg_head.bias[5] = 0.0  # half the mass on 5 steps, half on "never" (11 steps)
    losses = sft_losses(model, obs, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, dtype=torch.bool),
                        torch.tensor([5, 5]))
    assert abs(float(losses["never_p_demo"]) - 0.5) < 1e-4
    assert abs(float(losses["stg_mae"]) - 3.0) < 1e-3  # d = 0.5 * 5 + 0.5 * 11 = 8
    assert float(losses["stg_mae_reachable"]) < 1e-3  # renormalised, all on 5
    assert "stg_mae_reachable" not in sft_losses(_tiny_model(never=False), obs, torch.zeros(2, 2, dtype=torch.long),
                                                 torch.ones(2, dtype=torch.bool), torch.tensor([5, 5]))
    assert constant_guess_mae(torch.tensor([0, 1, 2, 10])) == 2.75  # median 1 (the lower middle)
    assert constant_guess_mae(torch.tensor([4, 4, 4])) == 0.0


def test_demos_hold_the_goal_and_label_it_zero_steps_to_go(tmp_path):
    config = load_config("language-table-quick", [f"runs_dir={tmp_path}", "data.hold_steps=3"])
    episode = demo_episode(config, seed=3)
    success = episode.info["is_success"]
    assert episode.true_success and success[-4:].all() and not success[-5]  # 3 steps held past the first success
    assert np.all(episode.actions[-3:] == 0)  # the hold is still
    writer = EpisodeWriter(tmp_path / "store", hold_steps=3)
    writer.add(episode)
    writer.close()
    frames = EpisodeStore(tmp_path / "store").frames()
    assert frames.steps_to_go[-5:].tolist() == [1, 0, 0, 0, 0] and frames.goal_reached.sum() == 4
    assert frames.steps_to_go[0] == episode.length - 3


def test_without_bc_at_the_goal_the_hold_trains_only_the_steps_to_go_head(tmp_path):
    from selfimprove.domains import make_env, model_spec
    from selfimprove.model.policy import EmbodiedModel
    from selfimprove.train.sft import FrameBatches

    config = load_config("language-table-quick", [f"runs_dir={tmp_path}", "data.hold_steps=3"])
    writer = EpisodeWriter(tmp_path / "store", hold_steps=3)
    writer.add(demo_episode(config, seed=3))
    writer.close()
    frames = EpisodeStore(tmp_path / "store").frames()
    model = EmbodiedModel(model_spec(config, make_env(config)))
    with_hold, without = FrameBatches(frames, model), FrameBatches(frames, model, bc_at_goal=False)
    # the three still actions at the goal lose their BC target; every other action keeps it
    assert with_hold.has_action[-5:].tolist() == [True, True, True, True, False]
    assert without.has_action[-5:].tolist() == [True, False, False, False, False]
    assert int(with_hold.has_action.sum()) - int(without.has_action.sum()) == 3
    assert torch.equal(with_hold.stg, without.stg)
