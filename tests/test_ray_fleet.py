"""The Ray fleet: a two-node cluster, robots killed mid-collection, a learner that crashes mid-iteration."""

import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from selfimprove.data.store import EpisodeStore  # noqa: E402
from selfimprove.domains import make_env  # noqa: E402
from selfimprove.fleet.local import seed_stream  # noqa: E402
from selfimprove.fleet.ray import RayFleet  # noqa: E402
from selfimprove.model.checkpoint import load_checkpoint  # noqa: E402
from selfimprove.reward import StepsToGoReward  # noqa: E402
from selfimprove.train import improve as improve_mod  # noqa: E402
from selfimprove.train.improve import episodes_dir, improve  # noqa: E402
from selfimprove.train.sft import sft_checkpoint  # noqa: E402

from conftest import quick_config  # noqa: E402
from test_pipeline import improve_records  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_ray(monkeypatch):
    """Each test starts without Ray and with no RAY_ADDRESS (it never joins a cluster already running), and
    leaves no Ray behind for the next."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray():
    """A local Ray cluster of this test's own."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def _episode_key(e):
    return (e.meta["seed"], e.meta["robot"], e.length, e.actions.tobytes(), e.stg.tobytes())


def _ray_fleet(trained_quick, **kwargs):
    model, _ = load_checkpoint(sft_checkpoint(trained_quick))
    reward = StepsToGoReward(model, threshold=1.0)
    fleet = RayFleet(lambda: make_env(trained_quick, terminate_on_success=False), model.spec, 4, reward,
                     robots_per_actor=2, **kwargs)
    return fleet, model


def test_collect_is_deterministic_and_versioned(trained_quick, local_ray):
    from selfimprove.fleet import BackgroundFleet, Fleet

    fleet, model = _ray_fleet(trained_quick)
    try:
        assert isinstance(fleet, Fleet) and isinstance(fleet, BackgroundFleet)  # it keeps the contract
        runs = [fleet.collect(model.state_dict(), 7, seeds=seed_stream(100), n_steps=600,
                              generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    finally:
        fleet.close()
    assert [_episode_key(e) for e in runs[0]] == [_episode_key(e) for e in runs[1]]
    assert sum(e.length for e in runs[0]) >= 600
    assert {e.meta["policy_version"] for e in runs[0]} == {7}
    assert {e.meta["robot"] for e in runs[0]} == {0, 1, 2, 3}
    assert len({e.meta["seed"] for e in runs[0]}) == len(runs[0])  # no seed used twice


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _robot_process(pid: int) -> int:
    """A pidfd of ``pid``, once confirmed to be a Ray robot actor: a signal sent through it reaches that process
    or nobody (ProcessLookupError), never another process that got its pid after it exited."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("needs pidfd (Linux >= 5.3) to signal a robot process safely")
    fd = os.pidfd_open(pid)
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        cmdline = b""
    if not cmdline.startswith(b"ray::RobotHost"):
        os.close(fd)
        raise AssertionError(f"process {pid} is not a robot actor ({cmdline[:40]!r}); not signalling it")
    return fd


def _signal_when_busy(pid: int, cpu_s: float, signum: int, outcome: dict) -> None:
    """Send ``signum`` to robot process ``pid`` once it has worked ``cpu_s`` seconds from now (surely
    mid-collection); ``outcome["signalled"]`` says whether it was (not when the process had gone)."""
    fd = _robot_process(pid)
    outcome["signalled"] = False
    try:
        start = _cpu_seconds(pid)
        deadline = time.time() + 60
        while time.time() < deadline:
            if _cpu_seconds(pid) - start >= cpu_s:
                signal.pidfd_send_signal(fd, signum)
                outcome["signalled"] = True
                return
            time.sleep(0.005)
    except (ProcessLookupError, FileNotFoundError):  # it exited: whatever holds its pid now is left alone
        pass
    finally:
        os.close(fd)


def _kill_when_busy(pid: int, cpu_s: float, outcome: dict) -> None:
    _signal_when_busy(pid, cpu_s, signal.SIGKILL, outcome)


def test_a_robot_actor_killed_mid_collection_is_restarted_and_nothing_is_lost(trained_quick, local_ray, caplog):
    fleet, model = _ray_fleet(trained_quick)
    try:
        def collect():
            return fleet.collect(model.state_dict(), 0, seeds=seed_stream(0), n_steps=8000,
                                 generator=torch.Generator().manual_seed(0))

        reference = collect()
        victim, outcome = fleet.describe()["actors"][1]["pid"], {}
        killer = threading.Thread(target=_kill_when_busy, args=(victim, 0.3, outcome))
        killer.start()
        with caplog.at_level(logging.WARNING, logger="selfimprove.fleet.ray"):
            survived = collect()
        killer.join()
        assert outcome == {"signalled": True}
        assert len(fleet.failures) == 1 and fleet.failures[0]["robots"] == [2, 3]
        assert "died" in caplog.text and "discarded" in caplog.text
        assert fleet.describe()["actors"][1]["pid"] != victim  # a new process hosts those robots
    finally:
        fleet.close()
    # the restarted actor re-ran its share from the same seeds: the batch is the one without the kill
    assert [_episode_key(e) for e in survived] == [_episode_key(e) for e in reference]


def test_two_node_cluster_runs_a_self_improvement_iteration(trained_quick, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        config = quick_config(tmp_path, "name=cluster", f"data.path={trained_quick.dataset_path}",
                              "improve.iterations=1", "improve.eval_every=0", "improve.guard=false", "improve.steps_per_iteration=256",
                              "fleet.backend=ray", f"fleet.address={cluster.address}", "fleet.robots=4",
                              "fleet.robots_per_actor=2")
        improve(config, sft_checkpoint(trained_quick), progress=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    placement = json.loads((config.run_dir / "fleet.json").read_text())
    assert placement["backend"] == "ray" and placement["nodes"] == 2 and len(placement["actors"]) == 2
    (record,) = improve_records(config)
    store = EpisodeStore(episodes_dir(config))
    assert record["iteration"] == 1 and record["robot_episodes"] == store.num_episodes > 0
    assert {store.episode_meta(i)["robot"] for i in range(store.num_episodes)} == {0, 1, 2, 3}


def test_learner_crash_after_saving_a_batch_trains_on_it_after_resume(trained_quick, tmp_path, monkeypatch):
    """Episodes are on disk before the update; --resume trains on them instead of collecting again."""
    sft_path = sft_checkpoint(trained_quick)

    def config(name):
        return quick_config(tmp_path, f"name={name}", f"data.path={trained_quick.dataset_path}",
                            "improve.iterations=3", "improve.eval_every=0", "improve.guard=false")

    straight = config("straight")
    improve(straight, sft_path, progress=False)
    crashed = config("crashed")
    real_update, calls = improve_mod.policy_update, []

    def update_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("learner crashed")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(improve_mod, "policy_update", update_then_crash)
    with pytest.raises(RuntimeError, match="learner crashed"):
        improve(crashed, sft_path, progress=False)
    monkeypatch.setattr(improve_mod, "policy_update", real_update)
    saved = EpisodeStore(episodes_dir(crashed)).num_episodes
    assert saved == EpisodeStore(episodes_dir(straight)).num_episodes  # batch 3 was saved before the crash
    collected = []
    monkeypatch.setattr(improve_mod.LocalFleet, "collect", lambda *a, **k: collected.append(1) or [])
    improve(crashed, sft_path, resume=True, progress=False)
    assert not collected  # nothing was collected again
    assert improve_records(crashed) == improve_records(straight)
    a, _ = load_checkpoint(crashed.run_dir / "checkpoints/improve")
    b, _ = load_checkpoint(straight.run_dir / "checkpoints/improve")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_stale_episodes_are_dropped(trained_quick, tmp_path, monkeypatch):
    """Only episodes within improve.max_staleness policy versions of the learner are trained on."""
    real_collect = improve_mod.LocalFleet.collect

    def collect_one_version_behind(self, weights, version, **kwargs):
        episodes = real_collect(self, weights, version, **kwargs)
        for e in episodes[::2]:
            e.meta["policy_version"] = version - 1
        return episodes

    monkeypatch.setattr(improve_mod.LocalFleet, "collect", collect_one_version_behind)
    for staleness, expect_dropped in ((0, True), (1, False)):
        config = quick_config(tmp_path, f"name=stale{staleness}", f"data.path={trained_quick.dataset_path}",
                              "improve.iterations=2", "improve.eval_every=0", "improve.guard=false", f"improve.max_staleness={staleness}")
        improve(config, sft_checkpoint(trained_quick), progress=False)
        records = improve_records(config)
        dropped = [r["stale_dropped"] for r in records]
        assert (all(d > 0 for d in dropped) if expect_dropped else dropped == [0, 0]), dropped
    assert np.isfinite(records[-1]["loss"])


@pytest.mark.slow  # timing-sensitive on a loaded 2-core machine (a restarted actor may start slowly)
def test_a_hung_robot_actor_is_killed_after_the_timeout_and_replaced(trained_quick, local_ray, caplog):
    fleet, model = _ray_fleet(trained_quick, timeout_s=15.0)
    try:
        def collect():
            return fleet.collect(model.state_dict(), 0, seeds=seed_stream(0), n_steps=2000,
                                 generator=torch.Generator().manual_seed(0))

        reference = collect()
        victim, outcome = fleet.describe()["actors"][0]["pid"], {}
        freezer = threading.Thread(target=_signal_when_busy, args=(victim, 0.1, signal.SIGSTOP, outcome))
        freezer.start()
        with caplog.at_level(logging.WARNING, logger="selfimprove.fleet.ray"):
            survived = collect()
        freezer.join()
        assert outcome == {"signalled": True}
        hung = [f for f in fleet.failures if "hung" in f["what"]]
        assert [f["robots"] for f in hung] == [[0, 1]] and "hung" in caplog.text
        assert fleet.describe()["actors"][0]["pid"] != victim
    finally:
        fleet.close()
    assert [_episode_key(e) for e in survived] == [_episode_key(e) for e in reference]


def test_overlapped_collection_trains_on_one_version_old_episodes(trained_quick, tmp_path):
    """max_staleness=1 on Ray: the next batch is collected during the update, by the previous policy."""
    config = quick_config(tmp_path, "name=overlap", f"data.path={trained_quick.dataset_path}",
                          "improve.iterations=3", "improve.eval_every=0", "improve.guard=false", "improve.max_staleness=1",
                          "fleet.backend=ray", "fleet.robots=4")
    improve(config, sft_checkpoint(trained_quick), progress=False)
    store = EpisodeStore(episodes_dir(config))
    versions = [store.episode_meta(i)["policy_version"] for i in range(store.num_episodes)]
    records = improve_records(config)
    assert [r["iteration"] for r in records] == [1, 2, 3] and all(r["stale_dropped"] == 0 for r in records)
    sizes = [r["batch_episodes"] for r in records]
    # batch 1 by policy 0; batches 2 and 3 were started before updates 1 and 2, by policies 0 and 1
    assert versions == [0] * sizes[0] + [0] * sizes[1] + [1] * sizes[2]


def test_run_survives_a_killed_robot_and_matches_an_undisturbed_run(trained_quick, tmp_path):
    """Stage 2 on Ray with a robot process SIGKILLed mid-run: same episodes, same learner, kill logged."""
    sft_path = sft_checkpoint(trained_quick)

    def config(name):
        return quick_config(tmp_path, f"name={name}", f"data.path={trained_quick.dataset_path}",
                            "improve.iterations=2", "improve.eval_every=0", "improve.guard=false", "improve.steps_per_iteration=4096",
                            "fleet.backend=ray", "fleet.robots=4")

    calm, stormy = config("calm"), config("stormy")
    improve(calm, sft_path, progress=False)

    outcome = {}

    def kill_a_robot():
        placement = stormy.run_dir / "fleet.json"
        deadline = time.time() + 120
        while not placement.exists() and time.time() < deadline:
            time.sleep(0.05)
        _kill_when_busy(json.loads(placement.read_text())["actors"][1]["pid"], 0.3, outcome)

    killer = threading.Thread(target=kill_a_robot)
    killer.start()
    improve(stormy, sft_path, progress=False)
    killer.join()
    assert outcome == {"signalled": True}
    failures = json.loads((stormy.run_dir / "fleet.json").read_text())["failures"]
    assert len(failures) == 1 and "died" in failures[0]["what"]
    drop = {"robot_failures"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in improve_records(stormy)] == [
        {k: v for k, v in r.items() if k not in drop} for r in improve_records(calm)]
    assert improve_records(stormy)[-1]["robot_failures"] == 1
    assert EpisodeStore(episodes_dir(stormy)).num_episodes == EpisodeStore(episodes_dir(calm)).num_episodes


def test_closing_the_fleet_stops_a_collection_in_another_thread_and_ray_is_never_touched_after(trained_quick):
    """close() while a thread waits on a collection: the thread gets a FleetError within a second, Ray (the
    fleet's own) is shut down after the fleet let go of it, and every later call is a clear error; the
    process lives on (Ray ends the whole process when it is used after ray.shutdown())."""
    from selfimprove.fleet.ray import FleetError

    fleet, model = _ray_fleet(trained_quick)
    assert fleet._owns_ray and ray.is_initialized()
    errors = []

    def collect():
        try:
            fleet.collect(model.state_dict(), 0, seeds=seed_stream(0), n_steps=200_000,
                          generator=torch.Generator().manual_seed(0))
        except FleetError as exc:
            errors.append(str(exc))

    collector = threading.Thread(target=collect)
    collector.start()
    deadline = time.time() + 120
    while not fleet._in_flight and time.time() < deadline:  # the collection is on the robots
        time.sleep(0.05)
    fleet.close()
    collector.join(timeout=30)
    assert not collector.is_alive() and errors == ["the Ray fleet was closed while a collection was in progress"]
    assert not ray.is_initialized() and fleet.actors == [] and fleet._in_flight == []
    for call in (fleet.describe, lambda: fleet.collect(model.state_dict(), 1, seeds=seed_stream(0), n_steps=10)):
        with pytest.raises(FleetError, match="this Ray fleet is closed"):
            call()
    fleet.close()  # twice: nothing to do


def test_starting_ray_keeps_the_stop_signal_handler(trained_quick):
    """ray.init replaces SIGTERM's handler with a bare exit; the fleet keeps the command's own (SIGTERM stops
    a run as Ctrl-C does, with the line that says how to resume)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        fleet, _ = _ray_fleet(trained_quick)
        try:
            assert signal.getsignal(signal.SIGTERM) is handler
        finally:
            fleet.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
