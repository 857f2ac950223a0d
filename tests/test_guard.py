"""The guard: checkpoint selection during Self-Improvement without the simulator's success."""

import json
import shutil

import numpy as np
import pytest
import torch

from selfimprove.config import load_config
from selfimprove.data.store import EpisodeStore
from selfimprove.domains import IMPROVE_SEED_BASE
from selfimprove.errors import ConfigError
from selfimprove.model.checkpoint import load_checkpoint, read_checkpoint_config
from selfimprove.pipeline import run_pipeline
from selfimprove.reward import StepsToGoReward
from selfimprove.train import guard as guard_module
from selfimprove.domains import describe_views, views_for
from selfimprove.train.guard import GUARD_SEED_BASE, GUARD_SHIFTS, best_checkpoint, blind
from selfimprove.stats import spearman
from selfimprove.train.improve import episodes_dir, improve, improve_checkpoint
from selfimprove.train.sft import sft_checkpoint

from conftest import quick_config

VOLATILE = {"collect_s", "update_s", "time_s"}


def _config(shared, tmp_path, name, iterations, *extra):
    return quick_config(tmp_path, f"name={name}", f"data.path={shared.dataset_path}",
                        f"improve.iterations={iterations}", "improve.eval_every=2", "improve.eval_episodes=10",
                        "improve.guard_every=1", "improve.guard_episodes=8", *extra)


def _records(config):
    lines = (config.run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines
            if json.loads(line)["stage"] == "improve"]


def _weights_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _fixed_scores(monkeypatch, scores):
    """Make check k score ``scores[k]`` (to test the selection, not the signal)."""
    calls = iter(scores)
    real = guard_module.score_episodes

    def fake(reward, episodes, views):
        result = real(reward, episodes, views)
        validation = all(GUARD_SEED_BASE <= e.meta["seed"] < IMPROVE_SEED_BASE for e in episodes)
        return {**result, "score": float(next(calls))} if validation else result

    monkeypatch.setattr(guard_module, "score_episodes", fake)


def test_guard_keeps_the_best_scoring_policy_and_records_every_check(trained_quick, tmp_path):
    config = _config(trained_quick, tmp_path, "g", 3)
    improve(config, sft_checkpoint(trained_quick), progress=False)
    records = _records(config)
    checks = [r for r in records if "guard_score" in r]
    assert [r["iteration"] for r in checks] == [0, 1, 2, 3]
    scores = [r["guard_score"] for r in checks]
    assert all(0 <= s <= 1 for s in scores)
    assert all(0 <= r["guard_detected_rate"] <= 1 and r["guard_episodes"] == 8 for r in checks)
    best = best_checkpoint(config)
    assert (best / "model.safetensors").exists() and (best / "config.json").exists()
    meta = read_checkpoint_config(best)["meta"]
    assert meta["guard_score"] == max(scores)
    assert meta["iteration"] == checks[int(np.argmax(scores))]["iteration"] == checks[-1]["guard_best_iteration"]
    load_checkpoint(best, expect_domain="pointmass")
    # best records what a later Stage 2 started from it needs (as the improve checkpoint does)
    provenance = ("sft", "threshold", "reward_model")
    improve_meta = read_checkpoint_config(improve_checkpoint(config))["meta"]
    assert {k: meta[k] for k in provenance} == {k: improve_meta[k] for k in provenance}
    assert meta["sft"] == meta["reward_model"] == str(sft_checkpoint(trained_quick))
    assert meta["threshold"] == json.loads((config.run_dir / "detector.json").read_text())["threshold"]
    # validation episodes are robot episodes, counted apart from practice
    assert checks[-1]["guard_robot_episodes"] == 4 * 8
    assert records[-1]["robot_episodes"] == EpisodeStore(episodes_dir(config)).num_episodes
    # the per-iteration signal is tracked on every practice batch
    assert all("view_agreement" in r and "confirmed_detected_rate" in r for r in records if r["iteration"] > 0)


@pytest.mark.parametrize("scores,best_iteration", [([0.9, 0.5, 0.4], 0), ([0.1, 0.2, 0.3], 2)])
def test_the_best_checkpoint_holds_the_weights_of_the_best_iteration(trained_quick, tmp_path, monkeypatch,
                                                                     scores, best_iteration):
    _fixed_scores(monkeypatch, scores)
    config = _config(trained_quick, tmp_path, "w", 2)
    final = improve(config, sft_checkpoint(trained_quick), progress=False)
    best, meta = load_checkpoint(best_checkpoint(config))
    assert meta["iteration"] == best_iteration and meta["guard_score"] == max(scores)
    expected, _ = load_checkpoint(sft_checkpoint(trained_quick) if best_iteration == 0 else final)
    assert _weights_equal(best, expected)


def test_the_guard_never_sees_true_success(trained_quick, tmp_path, monkeypatch):
    seen = []
    real = guard_module.fire_frame_signals

    def spy(reward, episodes, **kwargs):
        for e in episodes:
            assert e.true_success is None and e.info == {}
            assert e.meta["ended_by"] in ("detector", "timeout")  # never ended by the simulator's success
        seen.extend(episodes)
        return real(reward, episodes, **kwargs)

    monkeypatch.setattr(guard_module, "fire_frame_signals", spy)
    config = _config(trained_quick, tmp_path, "blind", 2)
    improve(config, sft_checkpoint(trained_quick), progress=False)
    validation = [e for e in seen if e.meta["seed"] < IMPROVE_SEED_BASE]
    assert len(validation) == 3 * 8 and len(seen) > len(validation)
    # the same fixed validation boards at every check, disjoint from eval and practice seeds
    by_check = {}
    for e in validation:
        by_check.setdefault(e.meta["policy_version"], set()).add(e.meta["seed"])
    assert len(by_check) == 3 and len({frozenset(s) for s in by_check.values()}) == 1
    seeds = next(iter(by_check.values()))
    assert all(GUARD_SEED_BASE <= s < GUARD_SEED_BASE + 1_000_000 for s in seeds)
    assert not seeds & set(range(config.eval.seed, config.eval.seed + 100_000))
    # an episode that still carries the simulator's success is refused
    reward = StepsToGoReward.from_checkpoint(sft_checkpoint(trained_quick), threshold=5.0)
    with pytest.raises(ValueError, match="blinded"):
        real(reward, [e.__class__(**{**e.__dict__, "true_success": True}) for e in seen[:1]])


def test_resume_keeps_the_best_and_continues_bit_for_bit(trained_quick, tmp_path):
    sft_path = sft_checkpoint(trained_quick)
    straight = _config(trained_quick, tmp_path, "straight", 4)
    improve(straight, sft_path, progress=False)
    improve(_config(trained_quick, tmp_path, "stopped", 2), sft_path, progress=False)
    resumed = _config(trained_quick, tmp_path, "stopped", 4)
    improve(resumed, sft_path, resume=True, progress=False)
    assert _records(resumed) == _records(straight)
    a, meta_a = load_checkpoint(best_checkpoint(resumed))
    b, meta_b = load_checkpoint(best_checkpoint(straight))
    assert meta_a == meta_b and _weights_equal(a, b)


def test_resume_does_not_replace_a_better_earlier_policy(trained_quick, tmp_path, monkeypatch):
    _fixed_scores(monkeypatch, [0.2, 0.9, 0.3, 0.4, 0.5])
    sft_path = sft_checkpoint(trained_quick)
    first = _config(trained_quick, tmp_path, "r", 2)
    improve(first, sft_path, progress=False)
    kept, meta = load_checkpoint(best_checkpoint(first))
    assert meta["iteration"] == 1
    improve(_config(trained_quick, tmp_path, "r", 4), sft_path, resume=True, progress=False)
    after, meta_after = load_checkpoint(best_checkpoint(first))
    assert meta_after == meta and _weights_equal(kept, after)
    assert _records(first)[-1]["guard_best_iteration"] == 1


def test_pipeline_summary_and_report_show_the_guarded_best(trained_quick, tmp_path):
    config = _config(trained_quick, tmp_path, "pipe", 2, "eval.episodes=20", "eval.videos=0")
    shutil.copytree(sft_checkpoint(trained_quick), sft_checkpoint(config))  # Stage 1 is reused
    summary = run_pipeline(config, resume=True, progress=False)
    guard = summary["guard"]
    assert guard["best"]["iteration"] in (0, 1, 2) and guard["checks"] == 3 and guard["robot_episodes"] == 24
    assert 0 <= guard["best"]["success_rate"] <= 1 and guard["best"]["eval_episodes"] == 20
    assert guard["best"]["ci95"][0] <= guard["best"]["success_rate"] <= guard["best"]["ci95"][1]
    assert json.loads((config.run_dir / "eval_best.json").read_text())["best_iteration"] == guard["best"]["iteration"]
    report = (config.run_dir / "report.md").read_text()
    assert "guarded best" in report and "![guard](guard.png)" in report
    assert "view changes (the mirror about y = 0) under which the detector also fires" in report
    assert (config.run_dir / "guard.png").stat().st_size > 1000


@pytest.mark.parametrize("scores,same_as", [([0.9, 0.5, 0.4], "sft"), ([0.1, 0.2, 0.3], "improve")])
def test_a_best_that_is_the_sft_or_final_policy_takes_over_its_evaluation(trained_quick, tmp_path, monkeypatch,
                                                                           scores, same_as):
    _fixed_scores(monkeypatch, scores)
    config = _config(trained_quick, tmp_path, f"same_{same_as}", 2, "eval.episodes=20", "eval.videos=0")
    shutil.copytree(sft_checkpoint(trained_quick), sft_checkpoint(config))
    evaluated = []
    real = guard_module.evaluate
    monkeypatch.setattr(guard_module, "evaluate", lambda *a, **k: evaluated.append(a[1]) or real(*a, **k))
    run_pipeline(config, resume=True, progress=False)
    assert evaluated == []  # the best checkpoint was not rolled out again
    best = json.loads((config.run_dir / "eval_best.json").read_text())
    source = sft_checkpoint(config) if same_as == "sft" else improve_checkpoint(config)
    assert best["same_weights_as"] == str(source)
    recomputed = real(config, best_checkpoint(config))  # and the numbers are what a rollout gives
    assert {k: best[k] for k in ("success_rate", "ci95", "mean_episode_length")} == \
        {k: recomputed[k] for k in ("success_rate", "ci95", "mean_episode_length")}


def test_guard_off_writes_no_best_and_no_guard_fields(trained_quick, tmp_path):
    config = _config(trained_quick, tmp_path, "off", 1, "improve.guard=false")
    improve(config, sft_checkpoint(trained_quick), progress=False)
    assert not best_checkpoint(config).exists()
    assert not any(k.startswith("guard") or k == "view_agreement" for r in _records(config) for k in r)


def test_guard_config_is_validated():
    assert load_config("pointmass-quick").improve.guard is True
    with pytest.raises(ConfigError, match="guard_episodes"):
        load_config("pointmass-quick", ["improve.guard_episodes=0"])
    with pytest.raises(ConfigError, match="guard_every"):
        load_config("pointmass-quick", ["improve.guard_every=-1"])
    assert load_config("pointmass-quick", ["improve.guard_every=none"]).improve.guard_every is None


def test_views_and_spearman():
    assert len(views_for("language-table", shifts=4)) == 5 and len(views_for("pointmass")) == 1
    assert views_for("reach", shifts=4) == [] and describe_views("reach", GUARD_SHIFTS) == ""  # a task of one's own
    for domain in ("language-table", "pointmass", "reach"):  # the words name what the guard scores with
        assert bool(describe_views(domain, GUARD_SHIFTS)) == bool(views_for(domain, GUARD_SHIFTS))
    tabletop = f"the left-right mirror of the board and {GUARD_SHIFTS} small scene shifts"
    assert describe_views("language-table", GUARD_SHIFTS) == tabletop
    obs = {"state": torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]), "instruction": ["x"]}
    assert torch.allclose(views_for("pointmass")[0](obs)["state"], torch.tensor([[0.1, -0.2, 0.3, -0.4, 0.5, -0.6]]))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 1, 2, 3]) == pytest.approx(1.0)
    assert np.isnan(spearman([1, 2], [1, 2])) and np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_blind_drops_the_simulator_success_only():
    from selfimprove.data.episode import Episode

    e = Episode(observations={"state": np.zeros((3, 6), np.float32)}, actions=np.zeros((2, 2), np.float32),
                instruction="go", true_success=True, meta={"ended_by": "detector"},
                info={"is_success": np.array([0, 0, 1], bool)}, stg=np.array([3.0, 2.0, 0.5], np.float32))
    b = blind(e)
    assert b.true_success is None and b.info == {} and b.meta == e.meta and e.true_success is True
    assert np.array_equal(b.stg, e.stg) and np.array_equal(b.actions, e.actions)


@pytest.mark.parametrize("domain, says, never", [
    ("reach", "the plain detector rate on the validation boards", "mirror"),
    ("language-table", f"(the left-right mirror of the board and {GUARD_SHIFTS} small scene shifts)", "plain"),
])
def test_guard_report_names_the_view_changes_of_the_domain(tmp_path, domain, says, never):
    (tmp_path / "config.json").write_text(json.dumps({"domain": domain}))
    check = {"stage": "improve", "iteration": 0, "guard_score": 0.5, "guard_detected_rate": 0.5,
             "guard_episodes": 4, "guard_robot_episodes": 4, "guard_best_iteration": 0, "guard_best_score": 0.5}
    from selfimprove.report import guard_report_lines

    text = "\n".join(guard_report_lines(tmp_path, [check], {}))
    assert says in text and never not in text
    assert "checkpoints/best` (iteration 0, score 0.500)" in text
