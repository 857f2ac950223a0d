"""BananaTable: one banana that no demo has shown, pushed to the 9 block2location locations."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from selfimprove.config import load_config
from selfimprove.domains import continue_on_board, make_env, model_spec
from selfimprove.envs.tabletop import tasks
from selfimprove.envs.tabletop.board import GEOMETRY, NOVEL_COLOURS_RGB, VIEW_X, VIEW_Y, X_BOUNDS, Y_BOUNDS
from selfimprove.envs.tabletop.expert import TabletopExpert
from selfimprove.envs.tabletop.world import TabletopEnv
from selfimprove.errors import ConfigError

BANANA_ID = "selfimprove/Tabletop-Banana-v0"


def _place(env: TabletopEnv, xy) -> None:
    """Put the banana at ``xy`` (metres) by hand, at rest."""
    body = env._blocks[0]
    body.position = (float(xy[0]) * 1000, float(xy[1]) * 1000)
    body.velocity, body.angular_velocity = (0.0, 0.0), 0.0
    env._cache = None


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (monotone chain)."""
    pts = sorted(map(tuple, points))

    def turn(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and turn(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = np.array(half(pts) + half(pts[::-1]))
    x, y = hull[:, 0], hull[:, 1]
    return float(abs((x * np.roll(y, -1) - np.roll(x, -1) * y).sum()) / 2)


def test_same_seed_same_banana_board():
    a, b = TabletopEnv(task="banana2location", image_size=32), gym.make(BANANA_ID, image_size=32)
    oa, ia = a.reset(seed=5)
    ob, ib = b.reset(seed=5)
    assert a.block_names == ("banana",) and b.unwrapped.task_family == "banana2location"
    assert oa["instruction"] == ob["instruction"] and "banana" in oa["instruction"]
    np.testing.assert_array_equal(ia["block_positions"], ib["block_positions"])
    np.testing.assert_array_equal(ia["block_angles"], ib["block_angles"])
    np.testing.assert_array_equal(oa["rgb"], ob["rgb"])
    assert ia["block_positions"].shape == (1, 2)
    _, other = a.reset(seed=6)
    assert not np.allclose(other["block_positions"], ia["block_positions"])


def test_banana_renders_yellow_and_is_not_a_block():
    size = 200
    env = TabletopEnv(task="banana2location", image_size=size, render_frames=1)
    env.reset(seed=0)
    image = env.render().astype(int)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    yellow = (r > 200) & (g > 170) & (b < 100)
    assert yellow.sum() > 50  # the banana is drawn in banana yellow ...
    assert np.all(image[yellow] == NOVEL_COLOURS_RGB["banana"])
    coloured = (np.abs(r - g) > 30) | (np.abs(g - b) > 30)
    assert not np.any(coloured & ~yellow)  # ... and it is the only coloured thing on the board
    # its pixels (in metres) make an elongated, curved shape: a cube is square and convex
    rows, cols = np.nonzero(yellow)
    pts = np.stack([VIEW_X[0] + (rows + 0.5) * (VIEW_X[1] - VIEW_X[0]) / size,
                    VIEW_Y[0] + (cols + 0.5) * (VIEW_Y[1] - VIEW_Y[0]) / size], 1)
    spread = np.sort(np.linalg.eigvalsh(np.cov(pts.T)))
    assert spread[1] > 6 * spread[0]  # long and thin
    pixel_area = len(pts) * (VIEW_X[1] - VIEW_X[0]) * (VIEW_Y[1] - VIEW_Y[0]) / size**2
    assert pixel_area < 0.9 * _hull_area(pts)  # concave: a crescent, not a polygon block
    outline = GEOMETRY["banana"].outline
    assert _hull_area(outline) > 1.2 * abs(float(np.sum(outline[:, 0] * np.roll(outline[:, 1], -1)
                                                        - np.roll(outline[:, 0], -1) * outline[:, 1]) / 2))


def test_banana_instructions_parse_and_round_trip():
    texts = tasks.all_banana2location_instructions()
    assert len(texts) == len(set(texts)) == 3 * 31  # verbs x location phrases
    for text in texts:
        task = tasks.parse_instruction(text)
        assert isinstance(task, tasks.Banana2LocationTask) and task.family == "banana2location"
        assert task.instruction == text
    parsed = tasks.parse_instruction("push the banana to the top left corner")
    assert parsed.location == "top_left" and parsed.block == "banana"
    assert tasks.parse_instruction("slide the banana towards the middle").location == "center"
    env = TabletopEnv(task="banana2location", image_size=None)
    for seed in range(10):
        obs, _ = env.reset(seed=seed)
        assert tasks.parse_instruction(obs["instruction"]) == env.task
    for text in ("push the banana next to the red moon", "push the red moon to the banana"):
        with pytest.raises(ConfigError, match="banana .*can only be pushed to a location"):
            tasks.parse_instruction(text)


def test_success_when_the_banana_is_at_its_target():
    task = tasks.Banana2LocationTask("banana", "top_left", "top left corner", "push the")
    corner = np.array(tasks.LOCATIONS["top_left"])
    assert task.is_success({"banana": corner + [0.11, 0.0]})
    assert not task.is_success({"banana": corner + [0.12, 0.0]})
    centre = tasks.Banana2LocationTask("banana", "center")
    assert centre.is_success({"banana": np.array(tasks.LOCATIONS["center"]) + [0.099, 0.0]})
    assert not centre.is_success({"banana": np.array(tasks.LOCATIONS["center"]) + [0.101, 0.0]})
    env = TabletopEnv(task="banana2location", image_size=None)
    for seed in range(5):
        env.reset(seed=seed)
        goal = env.task.goal_point()
        far = np.array([0.9 * X_BOUNDS[0] + 0.1 * X_BOUNDS[1], 0.0]) if goal[0] > 0.4 else np.array([0.55, 0.0])
        _place(env, far)
        assert not env.observe()[1]["is_success"]
        inside = np.clip(goal, [X_BOUNDS[0] + 0.03, Y_BOUNDS[0] + 0.03], [X_BOUNDS[1] - 0.03, Y_BOUNDS[1] - 0.03])
        _place(env, inside)
        _, _, terminated, _, info = env.step(np.zeros(2))
        assert info["is_success"] and terminated and info["goal_distance"] < env.task.threshold


def test_expert_solves_seeded_banana_boards():
    env = TabletopEnv(task="banana2location", image_size=None)
    expert = TabletopExpert()
    solved = 0
    for seed in range(20):
        env.reset(seed=seed)
        expert.reset(env, np.random.default_rng(seed))
        for _ in range(200):
            _, _, term, trunc, info = env.step(expert.act(env))
            if term or trunc:
                break
        solved += bool(info["is_success"])
    assert solved >= 18


def test_reset_free_hooks_on_the_banana_board():
    env = make_env(load_config("language-table-quick", [f"env.id={BANANA_ID}"]), terminate_on_success=False)
    env.reset(seed=3)
    base = env.unwrapped
    before = base.block_array().copy()
    for k in range(5):
        obs, info = continue_on_board(env, np.random.default_rng(k))
        np.testing.assert_array_equal(info["block_positions"], before)  # the banana stays put
        assert tasks.parse_instruction(obs["instruction"]) == base.task and not info["is_success"]
    # lying along a wall (centre just outside the bounds) the pusher cannot get behind it
    _place(base, [0.35, Y_BOUNDS[0] - 0.005])
    assert continue_on_board(env, np.random.default_rng(0)) == "unusable"
    _place(base, [0.35, 0.0])
    assert base.board_usable()


def test_block_mode_must_fit_the_family():
    with pytest.raises(ConfigError, match="block_mode 'BLOCK_8'.*'BANANA'"):
        TabletopEnv(task="banana2location", block_mode="BLOCK_8")
    with pytest.raises(ConfigError, match="block_mode 'BANANA'"):
        TabletopEnv(task="block2block", block_mode="BANANA")
    assert TabletopEnv(task="block2location", image_size=None).block_names == tasks.BLOCK_MODES["BLOCK_8"]


def test_a_block2block_model_reads_banana_observations(tmp_path):
    from selfimprove.evaluate import evaluate
    from selfimprove.fleet.local import LocalFleet, seed_stream
    from selfimprove.model.checkpoint import save_checkpoint
    from selfimprove.model.policy import EmbodiedModel
    from selfimprove.reward import StepsToGoReward
    from selfimprove.train.improve import reinforce_batch

    blocks = load_config("language-table-quick", [f"runs_dir={tmp_path}"])
    banana = load_config("language-table-quick", [f"runs_dir={tmp_path}", f"env.id={BANANA_ID}",
                                                  "eval.episodes=2", "eval.robots=2"])
    spec = model_spec(blocks, make_env(blocks))
    assert model_spec(banana, make_env(banana)) == spec  # same observations: a block2block model fits
    torch.manual_seed(0)
    model = EmbodiedModel(spec).eval()
    fleet = LocalFleet(lambda: make_env(banana, terminate_on_success=False), spec, 2,
                       StepsToGoReward(EmbodiedModel(spec), threshold=-1.0), reset_free=True)
    episodes = fleet.collect(model.state_dict(), 0, seeds=seed_stream(0), n_episodes=3,
                             generator=torch.Generator().manual_seed(0))
    assert len(episodes) == 3 and all("banana" in e.instruction for e in episodes)
    assert [e.meta["start"] for e in episodes].count("continued") >= 1
    assert all(np.isfinite(e.stg).all() and e.observations["image"].shape[1:] == (32, 32, 3) for e in episodes)
    _, acting, tokens, returns = reinforce_batch(episodes, model, 0.9)
    assert len(acting) == len(tokens) == len(returns) == sum(e.length for e in episodes)
    path = save_checkpoint(model, tmp_path / "random", meta={"stage": "sft"})
    result = evaluate(banana, path)
    assert result["eval_episodes"] == 2 and 0.0 <= result["success_rate"] <= 1.0


def test_banana_preset_matches_the_language_table_model():
    config = load_config("banana")
    assert config.env.id == BANANA_ID and config.domain == "language-table"
    assert config.data.path.endswith("language-table/demos")
    lt = load_config("language-table")
    assert model_spec(config, make_env(config)) == model_spec(lt, make_env(lt))
