"""The Aloha insertion domain: the MuJoCo env, its scripted expert, and the pipeline with only a config change."""

import json

import numpy as np
import pytest

# first: it picks the offscreen GL backend (MUJOCO_GL) before anything imports mujoco
scene = pytest.importorskip("selfimprove.envs.aloha.scene", exc_type=ImportError)

from selfimprove.config import load_config  # noqa: E402
from selfimprove.data.lerobot_export import export_lerobot  # noqa: E402
from selfimprove.data.store import EpisodeStore  # noqa: E402
from selfimprove.domains import domain_of_observations, make_env  # noqa: E402
from selfimprove.envs.aloha.expert import AlohaExpert  # noqa: E402
from selfimprove.envs.aloha.world import INSTRUCTION, AlohaInsertionEnv  # noqa: E402
from selfimprove.errors import ConfigError  # noqa: E402
from selfimprove.pipeline import run_pipeline  # noqa: E402


def test_reset_places_the_objects_from_the_seed_and_observes_joints_and_the_top_camera():
    env = AlohaInsertionEnv(image_size=32)
    obs, info = env.reset(seed=3)
    again, info_again = env.reset(seed=3)
    other, info_other = env.reset(seed=4)
    np.testing.assert_array_equal(info["peg_position"], info_again["peg_position"])
    assert not np.allclose(info["peg_position"], info_other["peg_position"])
    assert scene.PEG_X[0] <= info["peg_position"][0] <= scene.PEG_X[1]
    assert scene.SOCKET_X[0] <= info["socket_position"][0] <= scene.SOCKET_X[1]
    assert obs["rgb"].shape == (2, 32, 32, 3) and obs["rgb"].dtype == np.uint8
    np.testing.assert_array_equal(obs["rgb"], again["rgb"])
    assert obs["joints"].shape == (14,) and obs["instruction"] == INSTRUCTION
    assert "is_success" not in obs and info["is_success"] is False
    assert env.observation_space.contains({k: v for k, v in obs.items()})


def test_delta_actions_move_targets_from_where_the_joints_are_and_are_clipped():
    env = AlohaInsertionEnv(image_size=None)
    env.reset(seed=0)
    start = env.joints()
    env.step(np.full(14, 10.0, np.float32))  # clipped to +DELTA per joint, gripper to open
    np.testing.assert_allclose(env.data.ctrl[:6], start[:6] + scene.DELTA, atol=1e-6)
    assert env.data.ctrl[6] == pytest.approx(scene.FINGER_OPEN)
    absolute = AlohaInsertionEnv(image_size=None, action_mode="absolute")
    absolute.reset(seed=0)
    absolute.step(np.full(14, 10.0, np.float32))
    assert absolute.data.ctrl[0] == pytest.approx(scene.ABSOLUTE_HIGH[0])
    with pytest.raises(ValueError, match="finite"):
        env.step(np.full(14, np.nan))
    with pytest.raises(ConfigError, match="action_mode"):
        AlohaInsertionEnv(image_size=None, action_mode="velocity")


def test_two_cameras_are_tiled_side_by_side():
    env = AlohaInsertionEnv(image_size=16, cameras=("top", "left_wrist"), render_frames=1)
    obs, _ = env.reset(seed=0)
    assert obs["rgb"].shape == (1, 16, 32, 3)
    with pytest.raises(ConfigError, match="cameras"):
        AlohaInsertionEnv(image_size=16, cameras=("side",))


@pytest.mark.parametrize("mode", ["delta", "absolute"])
def test_the_scripted_expert_inserts_the_peg_from_most_placements(mode):
    env = AlohaInsertionEnv(image_size=None, action_mode=mode)
    expert = AlohaExpert()
    successes, lengths = 0, []
    for seed in range(8):
        env.reset(seed=100 + seed)
        expert.reset(env, np.random.default_rng(seed))
        for t in range(80):
            _, _, terminated, truncated, info = env.step(expert.act(env))
            if terminated or truncated:
                break
        successes += info["is_success"]
        lengths.append(t + 1)
    assert successes >= 7, successes  # ~97% over 200 placements (docs/aloha.md)
    assert 40 <= np.median(lengths) <= 60


def test_no_offscreen_gl_is_a_clear_error_naming_the_settings(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Cannot initialize a EGL device display")

    monkeypatch.setattr(scene.mujoco, "Renderer", broken)
    monkeypatch.setattr(scene, "_RENDERERS", {})
    with pytest.raises(ConfigError, match="MUJOCO_GL=osmesa"):
        AlohaInsertionEnv(image_size=24)


def test_episodes_are_told_apart_from_the_other_domains():
    assert domain_of_observations({"joints": [14], "image": [64, 64, 3]}) == "aloha"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    config = load_config("aloha-quick", [f"runs_dir={tmp_path_factory.mktemp('aloha')}"])
    return config, run_pipeline(config, progress=False)


def test_quick_aloha_run_end_to_end_and_lerobot_export(quick_run, tmp_path):
    config, summary = quick_run
    assert summary["domain"] == "aloha" and summary["improve"]["robot_episodes"] > 0
    assert summary["sft"]["eval_episodes"] == config.eval.episodes
    episode = EpisodeStore(config.dataset_path).episodes([0])[0]
    assert episode.true_success and episode.instruction == INSTRUCTION
    assert episode.observations["joints"].shape[1:] == (14,) and episode.actions.shape[1:] == (14,)
    assert (config.run_dir / "report.md").exists()
    env = make_env(config)
    assert env.action_space.shape == (14,)
    out = tmp_path / "lerobot"
    export_lerobot(config.dataset_path, out, "aloha")
    features = json.loads((out / "meta/info.json").read_text())["features"]
    assert features["observation.images.top"]["shape"] == [32, 32, 3]
    assert features["observation.state"]["shape"] == [14] and features["action"]["shape"] == [14]


def test_a_dropped_peg_is_found_after_it_was_lifted_and_its_steps_to_go_are_plotted(tmp_path):
    from selfimprove.data.episode import Episode
    from selfimprove.diagnose.setback import distribution, find_setback, plot_setback
    from selfimprove.domains import model_spec
    from selfimprove.domains.aloha import peg_dropped
    from selfimprove.model.policy import EmbodiedModel

    config = load_config("aloha-quick")
    env = make_env(config)
    obs, _ = env.reset(seed=0)
    frames = [obs]
    for _ in range(6):
        frames.append(env.step(env.action_space.sample())[0])
    heights = np.array([0.01, 0.01, 0.08, 0.1, 0.05, 0.01, 0.01])

    def episode(z):
        return Episode(observations={"image": np.stack([f["rgb"][-1] for f in frames]),
                                     "joints": np.stack([f["joints"] for f in frames])},
                       actions=np.zeros((6, 14), np.float32), instruction=INSTRUCTION, true_success=False,
                       meta={"seed": 7}, info={"peg_position": np.stack([np.zeros_like(z), z + 0.5, z], axis=1)})

    assert peg_dropped(episode(heights)) == 5
    assert peg_dropped(episode(np.full(7, 0.01))) is None  # never lifted: nothing dropped
    assert find_setback("language-table", [episode(heights)]) is None  # a domain without setbacks
    model = EmbodiedModel(model_spec(config, env))
    shown = plot_setback(model, "aloha", [episode(np.full(7, 0.01)), episode(heights)], tmp_path)
    assert shown["step"] == 5 and shown["seed"] == 7 and (tmp_path / "setback.png").stat().st_size > 0
    probs = distribution(model, episode(heights))
    assert probs.shape == (7, model.spec.max_steps + 1) and np.allclose(probs.sum(1), 1) and probs.min() >= 0


def test_a_diverged_simulation_ends_the_episode_instead_of_going_on_teleported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo writes its warning to MUJOCO_LOG.TXT in the working folder
    env = AlohaInsertionEnv(image_size=None)
    env.reset(seed=0)
    env.data.qvel[:] = 1e12  # MuJoCo finds a bad acceleration and resets the state
    _, _, terminated, truncated, info = env.step(np.zeros(14, np.float32))
    assert truncated and not terminated and info.get("diverged") and not info["is_success"]
