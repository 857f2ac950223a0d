"""The tabletop domain through the same pipeline, with only a config change."""

import json
import shutil

import numpy as np
import pytest

from selfimprove.cli import main
from selfimprove.config import load_config
from selfimprove.data.store import EpisodeStore
from selfimprove.errors import ConfigError
from selfimprove.evaluate import evaluate
from selfimprove.pipeline import run_pipeline
from selfimprove.train.sft import sft_checkpoint


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    config = load_config("language-table-quick", [f"runs_dir={tmp_path_factory.mktemp('lt')}"])
    return config, run_pipeline(config, progress=False)


def test_quick_language_table_run_end_to_end(quick_run):
    config, summary = quick_run
    assert summary["domain"] == "language-table"
    assert summary["improve"]["robot_episodes"] > 0 and summary["sft"]["eval_episodes"] == config.eval.episodes
    assert set(summary["controls"]) == {"sft_temperature_0"} and summary["demo_episodes"] == 54
    info = json.loads((config.dataset_path / "meta/info.json").read_text())
    assert info["features"]["observation.image"]["dtype"] == "image"
    assert info["features"]["observation.image"]["shape"] == [32, 32, 3]
    assert info["total_tasks"] > 1  # instructions vary per board
    episode = EpisodeStore(config.dataset_path).episodes([0])[0]
    assert episode.true_success and episode.instruction.split()[0] in ("push", "move", "slide", "put")
    assert (config.run_dir / "report.md").exists()


def test_image_of_the_wrong_size_is_a_clear_error(quick_run):
    config, _ = quick_run
    bigger = load_config("language-table-quick", [f"runs_dir={config.runs_dir}", "env.kwargs={\"image_size\": 48}"])
    with pytest.raises(ConfigError, match=r"'image' of shape \[48, 48, 3\] but the model expects \[32, 32, 3\]"):
        evaluate(bigger, sft_checkpoint(config), episodes=1)


def test_a_tabletop_model_is_evaluated_on_paraphrases_and_trains_on_free_form_instructions(quick_run, tmp_path,
                                                                                          caplog):
    """Words outside the templates: evaluation gives a success rate (the env scores its own task), and a
    store whose every instruction is outside the grammar trains (with a warning)."""
    import pyarrow.parquet as pq

    from selfimprove.data.v3 import TASKS_PATH, read_tasks, tasks_table
    from selfimprove.envs.tabletop.tasks import paraphrase, parse_instruction
    from selfimprove.train.sft import sft

    config, _ = quick_run
    paraphrased = load_config("language-table-quick", [f"runs_dir={config.runs_dir}", "env.kwargs.phrasing=paraphrase"])
    result = evaluate(paraphrased, sft_checkpoint(config), episodes=4)
    assert 0.0 <= result["success_rate"] <= 1.0 and result["eval_episodes"] == 4
    store = tmp_path / "free-form"
    shutil.copytree(config.dataset_path, store)
    tasks = read_tasks(store, ours=True)
    pq.write_table(tasks_table([paraphrase(parse_instruction(tasks[i])) for i in sorted(tasks)], pandas_index=False),
                   store / TASKS_PATH)
    free = load_config("language-table-quick", [f"runs_dir={tmp_path}", "name=free", f"data.path={store}",
                                                "sft.steps=4", "sft.eval_every=2", "sft.checkpoint_every=2"])
    with caplog.at_level("WARNING"):
        checkpoint = sft(free, progress=False)
    assert (checkpoint / "model.safetensors").exists()
    assert f"{len(tasks)} of its {len(tasks)} instructions" in caplog.text


def test_practice_may_train_only_the_fusion_mlp_and_action_decoder_and_resumes(quick_run, tmp_path):
    """improve.train = "fusion": the convs and text projection stay at SFT (their features are computed
    once per frame), the fusion MLP and the action decoder learn, and --resume continues the run."""
    import torch

    from selfimprove.model.checkpoint import load_checkpoint
    from selfimprove.model.inputs import from_histories
    from selfimprove.train.improve import improve

    config, _ = quick_run
    sft_model, _ = load_checkpoint(sft_checkpoint(config))
    demo = EpisodeStore(config.dataset_path).episodes([0])[0]
    frames = [{k: v[t] for k, v in demo.observations.items()} for t in range(3)]
    batch = from_histories([frames[:1], frames[:2], frames], [demo.instruction] * 3, sft_model.spec)
    with torch.no_grad():
        assert torch.equal(sft_model.action_logits_from_fusion(sft_model.fusion_inputs(batch)), sft_model(batch)[0])

    def run(iterations: int) -> dict:
        practice = load_config("language-table-quick", [f"runs_dir={tmp_path}", "name=fusion",
                                                        f"data.path={config.dataset_path}", "improve.train=fusion",
                                                        f"improve.iterations={iterations}", "improve.eval_every=0",
                                                        "improve.guard=false", "improve.objective=ppo",
                                                        "improve.kl_coef=0.1"])
        improve(practice, sft_checkpoint(config), resume=iterations > 1, progress=False)
        return load_checkpoint(practice.run_dir / "checkpoints/improve")[0].state_dict()

    run(1)
    after = run(2)
    before = sft_model.state_dict()
    trained = {name for name in before if name.startswith(("encoder.mlp.", "action_head."))}
    assert trained and all(torch.equal(before[n], after[n]) for n in before if n not in trained)
    assert any(not torch.equal(before[n], after[n]) for n in trained)
    lines = (tmp_path / "fusion/metrics.jsonl").read_text().splitlines()
    assert [r["iteration"] for r in map(json.loads, lines) if r.get("stage") == "improve" and r["iteration"]] == [1, 2]
    with pytest.raises(ConfigError, match="needs model.encoder 'film' or 'late_fusion'"):
        load_config("pointmass-quick", ["improve.train=fusion"])
    with pytest.raises(ConfigError, match="improve.train must be one of"):
        load_config("language-table-quick", ["improve.train=convs"])


def test_true_progress_control_pays_the_distance_covered_and_ends_on_success(quick_run, tmp_path):
    """improve.reward = "true_progress": the fleet records the simulator's distance to the goal per frame
    and the simulator, not the detector, ends episodes; domains without that distance are refused."""
    from selfimprove.train.improve import episode_rewards, episodes_dir, improve

    config, _ = quick_run
    practice = load_config("language-table-quick", [f"runs_dir={tmp_path}", "name=progress",
                                                    f"data.path={config.dataset_path}", "improve.reward=true_progress",
                                                    "improve.iterations=1", "improve.eval_every=0",
                                                    "improve.guard=false", "improve.steps_per_iteration=256"])
    improve(practice, sft_checkpoint(config), progress=False)
    episodes = EpisodeStore(episodes_dir(practice)).episodes()
    assert episodes and {e.meta["ended_by"] for e in episodes} <= {"success", "timeout"}
    for e in episodes:
        g = e.info["goal_distance"]
        assert g.shape == (e.length + 1,)
        assert episode_rewards(e, "true_progress").sum() == pytest.approx(1 - g[-1] / g[0] + e.true_success, abs=1e-4)
    with pytest.raises(ConfigError, match="reports its distance to the goal; domain 'pointmass'"):
        load_config("pointmass-quick", ["improve.reward=true_progress"])


def test_a_pointmass_checkpoint_is_refused_by_the_tabletop(quick_run, tmp_path, capsys):
    config, _ = quick_run
    assert main(["eval", "pointmass-quick", "--checkpoint", str(sft_checkpoint(config)),
                 "--runs-dir", str(tmp_path), "--eval-episodes", "1"]) == 2
    assert "'language-table' domain, but this run is 'pointmass'" in capsys.readouterr().err


def test_mirror_of_instruction_roles_gives_different_text_features():
    from selfimprove.model.backbones import make_text_encoder

    enc = make_text_encoder("hashed_bow")
    a, b = enc.encode(["push the red moon to the blue cube", "push the blue cube to the red moon"])
    assert not np.allclose(a.detach().numpy(), b.detach().numpy())


def test_mirror_augmentation_flips_image_y_and_dy_consistently():
    import torch

    from selfimprove.domains.tabletop import mirror_instruction, mirror_tabletop

    image = torch.zeros(2, 2, 4, 6, 3, dtype=torch.uint8)
    image[:, :, 1, 0] = 255  # a bright pixel at the left edge
    obs = {"image": image, "effector": torch.tensor([[0.3, 0.1], [0.3, 0.1]]),
           "instruction": ["push the red moon to the left side", "push the red moon to the left side"]}
    tokens = torch.tensor([[3, 0], [3, 0]])
    out, tok = mirror_tabletop(obs, tokens, 41, torch.tensor([True, False]))
    assert out["image"][0, :, 1, 5].sum() > 0 and out["image"][0, :, 1, 0].sum() == 0
    assert torch.equal(out["image"][1], image[1])
    assert out["effector"][0].tolist() == pytest.approx([0.3, -0.1]) and out["effector"][1, 1] == pytest.approx(0.1)
    assert tok.tolist() == [[3, 40], [3, 0]]
    assert out["instruction"][0].endswith("right side") and mirror_instruction("push the red moon to the blue cube") \
        == "push the red moon to the blue cube"


def test_pretrained_initialisation_builds_and_runs_offline(monkeypatch):
    """The paper's 'unimodally pretrained' model: frozen ImageNet MobileNetV2 stem + MiniLM, no network."""
    import torch

    from selfimprove.model.policy import EmbodiedModel, ModelSpec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(domain="language-table", obs_shapes={"image": [32, 32, 3], "effector": [2]},
                     action_low=[-0.1, -0.1], action_high=[0.1, 0.1], action_bins=41, max_steps=50, hidden=32,
                     layers=1, encoder="film", frames=2, image_init="pretrained", text_encoder="minilm",
                     channels=[16])
    model = EmbodiedModel(spec)
    obs = {"image": torch.randint(0, 255, (3, 2, 32, 32, 3), dtype=torch.uint8), "effector": torch.zeros(3, 2),
           "instruction": ["push the red moon to the blue cube", "push the blue cube to the red moon",
                           "push the green star to the top left corner"]}
    action_logits, stg_logits = model(obs)
    assert action_logits.shape == (3, 2, 41) and stg_logits.shape == (3, 51)
    text = model.encoder.text.encode(obs["instruction"][:2])
    assert text.shape == (2, 3 * 384) and not torch.allclose(text[0], text[1])
    frozen = [p for p in model.encoder.stem.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_flip_augmentation_moves_image_x_and_dx_together_and_spares_locations():
    import torch

    from selfimprove.domains.tabletop import flip_tabletop
    from selfimprove.envs.tabletop.board import VIEW_X
    from selfimprove.envs.tabletop.world import TabletopEnv

    env = TabletopEnv(image_size=32)
    obs0, _ = env.reset(seed=4)
    image = torch.as_tensor(obs0["rgb"])[None].repeat(2, 1, 1, 1, 1)
    effector = torch.as_tensor(obs0["effector"])[None].repeat(2, 1)
    obs = {"image": image, "effector": effector,
           "instruction": ["push the red moon to the blue cube", "push the red moon to the top left corner"]}
    out, tok = flip_tabletop(obs, torch.tensor([[3, 5], [3, 5]]), 41, torch.tensor([True, True]))
    assert torch.equal(out["image"][0], image[0].flip(-3)) and torch.equal(out["image"][1], image[1])
    assert out["effector"][0, 0] == pytest.approx(VIEW_X[0] + VIEW_X[1] - float(effector[0, 0]))
    assert out["effector"][0, 1] == effector[0, 1] and torch.equal(out["effector"][1], effector[1])
    assert tok.tolist() == [[37, 5], [3, 5]]  # dx mirrored about the middle bin; a location goal is left alone

    def pusher_row(img):  # the pusher is the only light-grey object
        mask = (img[..., 0] > 150) & (img[..., 0] == img[..., 1]) & (img[..., 1] == img[..., 2])
        return float(torch.nonzero(mask).float().mean(0)[0])

    rows_per_metre = 32 / (VIEW_X[1] - VIEW_X[0])
    for img, x in ((image[0, -1], effector[0, 0]), (out["image"][0, -1], out["effector"][0, 0])):
        assert pusher_row(img) == pytest.approx((float(x) - VIEW_X[0]) * rows_per_metre - 0.5, abs=1.0)  # rasterisation


def test_recolour_augmentation_permutes_block_colours_in_pixels_and_words_together():
    import torch

    from selfimprove.domains.tabletop import recolour_tabletop
    from selfimprove.envs.tabletop.board import COLOURS_RGB, NOVEL_COLOURS_RGB
    from selfimprove.envs.tabletop.world import TabletopEnv

    env = TabletopEnv(image_size=48)
    obs0, _ = env.reset(seed=5)
    image = torch.as_tensor(obs0["rgb"])[None].repeat(16, 1, 1, 1, 1)
    image[:, :, 0, 0] = torch.tensor(NOVEL_COLOURS_RGB["banana"], dtype=torch.uint8)  # not a block colour
    text = "push the red moon to the blue cube"
    rows = torch.ones(16, dtype=torch.bool)
    rows[0] = False
    out, _ = recolour_tabletop({"image": image, "instruction": [text] * 16}, torch.zeros(16, 2), 41, rows,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["image"][0], image[0]) and out["instruction"][0] == text
    palette = {name: torch.tensor(rgb, dtype=torch.uint8) for name, rgb in COLOURS_RGB.items()}
    changed = 0
    for i in range(1, 16):
        mapping = {}
        for name, rgb in palette.items():
            mask = (image[i] == rgb).all(-1)
            assert mask.any()
            colours = out["image"][i][mask].unique(dim=0)
            assert len(colours) == 1  # every pixel of one colour gets the same new colour
            mapping[name] = next(n for n, c in palette.items() if torch.equal(c, colours[0]))
        assert sorted(mapping.values()) == sorted(palette)  # a permutation
        still = ~torch.stack([(image[i] == rgb).all(-1) for rgb in palette.values()]).any(0)
        assert torch.equal(out["image"][i][still], image[i][still])  # board, pusher, banana untouched
        assert out["instruction"][i] == f"push the {mapping['red']} moon to the {mapping['blue']} cube"
        changed += out["instruction"][i] != text
    assert changed >= 8


def test_shift_augmentation_moves_image_and_coordinates_together():
    import torch

    from selfimprove.domains.tabletop import shift_tabletop
    from selfimprove.envs.tabletop.world import TabletopEnv

    env = TabletopEnv(image_size=32)
    obs0, _ = env.reset(seed=4)
    image = torch.as_tensor(obs0["rgb"][-1])
    effector = torch.as_tensor(obs0["effector"])
    obs = {"image": image[None, None].repeat(64, 1, 1, 1, 1), "effector": effector[None].repeat(64, 1)}
    rows = torch.ones(64, dtype=torch.bool)
    out, _ = shift_tabletop(obs, torch.zeros(64, 2, dtype=torch.long), 41, rows,
                            generator=torch.Generator().manual_seed(0))

    def pusher_pixel(img):  # the pusher is the only light-grey object
        mask = (img[..., 0] > 150) & (img[..., 0] == img[..., 1]) & (img[..., 1] == img[..., 2])
        return torch.nonzero(mask).float().mean(0)

    base = pusher_pixel(image)
    moved = 0
    for i in range(64):
        pix = pusher_pixel(out["image"][i, 0])
        d_pix = pix - base
        d_m = out["effector"][i] - effector
        # rows follow x and columns follow y: the effector moved with its drawing
        assert torch.allclose(d_m * torch.tensor([32 / 0.5, 32 / 0.6596]), d_pix, atol=0.6)
        moved += int(d_pix.abs().sum() > 0)
    assert moved > 40


def test_shift_augmentation_is_a_crop_of_the_edge_padded_frames():
    import torch

    from selfimprove.domains.tabletop import shift_tabletop

    image = torch.randint(0, 256, (12, 2, 9, 7, 3), dtype=torch.uint8)
    rows = torch.arange(12) % 3 != 0
    out, _ = shift_tabletop({"image": image}, torch.zeros(12, 2, dtype=torch.long), 41, rows, max_pixels=3,
                            generator=torch.Generator().manual_seed(1))
    offsets = torch.randint(-3, 4, (12, 2), generator=torch.Generator().manual_seed(1))  # the same draws
    offsets[~rows] = 0
    for i, (dr, dc) in enumerate(offsets.tolist()):
        r = (torch.arange(9) + dr).clamp(0, 8)
        c = (torch.arange(7) + dc).clamp(0, 6)
        assert torch.equal(out["image"][i], image[i][:, r][:, :, c])


def test_sft_batches_depend_only_on_the_runs_generator(quick_run):
    """Augmentations draw from the step's generator, not torch's global one: a resumed run (whose
    global state differs) trains on the same batches as an uninterrupted one."""
    import torch

    from selfimprove.domains import make_env, model_spec
    from selfimprove.model.policy import EmbodiedModel
    from selfimprove.train.sft import FrameBatches, SFTStep

    config, _ = quick_run
    store = EpisodeStore(config.dataset_path)
    frames = store.frames()
    model = EmbodiedModel(model_spec(config, make_env(config)))
    step = SFTStep(config, model, torch.optim.SGD(model.parameters(), lr=0.0), FrameBatches(frames, model),
                   frames.instructions)
    batches = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        batches.append(step.batch(torch.Generator().manual_seed(0)))
    (a, ta, _, _), (b, tb, _, _) = batches
    assert torch.equal(ta, tb) and a["instruction"] == b["instruction"]
    assert all(torch.equal(a[k], b[k]) for k in a if k != "instruction")
