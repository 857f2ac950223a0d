"""Ray fleet: robots in Ray actors, on this machine or across a cluster.

Each actor hosts ``robots_per_actor`` robots as a :class:`LocalFleet` (so their policy inference is
one batched forward pass, as on a real robot with its own copy of the policy); the learner only
trains. Weights travel once per policy version through Ray's object store; every episode carries
the version that collected it.

Work is split deterministically: actor ``j`` gets its own block of seeds and its own sampling seed,
and results are concatenated in actor order, so a run is reproducible whichever actor finishes
first. A robot actor that dies or stays silent longer than ``timeout_s`` is killed, restarted by
Ray, and its share of the collection is run again from the same seeds; the partial episodes it had
in progress are discarded and logged.

Closing is safe from any thread and at any time: a collection waiting in another thread stops within a
second with a :class:`FleetError`, the robots are killed and every reference into Ray the fleet holds is
dropped before a Ray this fleet started is shut down; any later call raises :class:`FleetError` instead of
touching Ray (which ends the whole process when it is used after ``ray.shutdown()``).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import gymnasium as gym
import numpy as np
import torch

from selfimprove.data.episode import Episode
from selfimprove.errors import SelfImproveError
from selfimprove.model.policy import EmbodiedModel, ModelSpec
from selfimprove.reward import StepsToGoReward

log = logging.getLogger(__name__)

try:
    import ray
except ImportError:  # pragma: no cover - exercised only without the extra installed
    ray = None


class FleetError(SelfImproveError):
    """The fleet could not deliver episodes (robots kept failing, or Ray is missing)."""


def require_ray() -> Any:
    if ray is None:
        raise FleetError("fleet.backend='ray' needs Ray: pip install 'selfimprove[ray]'")
    return ray


def init_ray(address: str | None = None, bind_host: str = "127.0.0.1", num_cpus: int | None = None) -> bool:
    """Connect to ``address`` or start a local Ray whose ports bind to ``bind_host``.

    Returns True when this call started Ray (so the caller should shut it down).
    """
    rt = require_ray()
    if rt.is_initialized():
        return False
    quiet = {"log_to_driver": False, "configure_logging": True, "logging_level": logging.WARNING}
    # ray.init replaces the SIGTERM handler with a bare exit: keep ours (stop as on Ctrl-C, say how to resume)
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address:
            host = address.split("://")[-1].rsplit(":", 1)[0]
            if host in ("127.0.0.1", "localhost"):  # a cluster bound to loopback: join it from loopback too
                quiet["_node_ip_address"] = "127.0.0.1"
            rt.init(address=address, **quiet)
        else:  # "local": a Ray of our own, whatever RAY_ADDRESS says (fleet.address names a cluster to join)
            rt.init(address="local", num_cpus=num_cpus, _node_ip_address=bind_host, include_dashboard=False, **quiet)
    finally:
        if main and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return True


def _numpy_weights(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """State dict as numpy (zero-copy reads from Ray's object store on the robots).

    bfloat16 tensors (a Hugging Face backbone on a GPU) travel as float32: numpy has no bfloat16.
    """
    return {k: (v.detach().cpu().float() if v.dtype == torch.bfloat16 else v.detach().cpu()).numpy()
            for k, v in weights.items()}


@dataclass
class _Collection:
    """A collection in flight: what each actor was given, and what came back."""

    weights_ref: Any
    version: int
    shares: list[int]
    by_steps: bool
    temperature: float
    tasks: list[tuple[list[int], int]] = field(default_factory=list)
    pending: dict[Any, tuple[int, float]] = field(default_factory=dict)
    results: dict[int, list[Episode]] = field(default_factory=dict)
    restarts: int = 0


class RobotHost:
    """One Ray actor: a few robots, a policy copy and the frozen reward model (a LocalFleet)."""

    def __init__(self, make_env: Callable[[], gym.Env], spec: ModelSpec, n_robots: int, robot_offset: int,
                 reward_state: list[dict[str, np.ndarray]] | None, detector: dict[str, Any], reset_free: bool,
                 reset_every: int, record_info: tuple[str, ...] = ()) -> None:
        from selfimprove.fleet.local import LocalFleet

        torch.set_num_threads(1)
        reward = None
        if reward_state is not None:
            members = []
            for state in reward_state:  # the reward model, then any ensemble members (one spec)
                model = EmbodiedModel(ModelSpec(**detector["spec"]))  # the reward model's own spec
                model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
                members.append(model)
            reward = StepsToGoReward(members[0], detector["threshold"], detector["hold"], members[1:],
                                     detector.get("detector", "steps_to_go"))
        self.fleet = LocalFleet(make_env, spec, n_robots, reward, reset_free=reset_free, reset_every=reset_every,
                                robot_offset=robot_offset, record_info=record_info)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def collect(self, weights: dict[str, np.ndarray], version: int, seeds: list[int], n_steps: int | None,
                n_episodes: int | None, temperature: float, sample_seed: int) -> tuple[list[Episode], int]:
        generator = torch.Generator().manual_seed(sample_seed)
        episodes = self.fleet.collect(weights, version, seeds=iter(seeds), n_steps=n_steps, n_episodes=n_episodes,
                                      temperature=temperature, generator=generator)
        return episodes, self.fleet.skipped_starts


class RayFleet:
    """``n_robots`` robots spread over Ray actors; same ``collect`` contract as LocalFleet."""

    def __init__(self, make_env: Callable[[], gym.Env], spec: ModelSpec, n_robots: int,
                 reward: StepsToGoReward | None = None, *, robots_per_actor: int = 0, address: str | None = None,
                 bind_host: str = "127.0.0.1", timeout_s: float = 600.0, max_restarts: int = 3,
                 reset_free: bool = False, reset_every: int = 0, scheduling: str = "SPREAD",
                 record_info: tuple[str, ...] = ()) -> None:
        rt = require_ray()
        if n_robots < 1:
            raise ValueError("a fleet needs at least one robot")
        self._owns_ray = init_ray(address, bind_host)
        if robots_per_actor <= 0:
            cpus = max(1, int(rt.available_resources().get("CPU", 1)))
            robots_per_actor = -(-n_robots // min(n_robots, cpus))
        self.spec, self.timeout_s, self.max_restarts = spec, timeout_s, max_restarts
        self.startup_s = max(120.0, timeout_s)  # starting a robot process (imports, envs) is not a hang
        self.reward = reward
        self.version: int | None = None
        self._weights_ref = None
        self.failures: list[dict[str, Any]] = []  # one record per robot actor that crashed or hung
        # held for the fleet's lifetime: a restarted actor is rebuilt from these same arguments
        self._reward_ref = (rt.put([_numpy_weights(m.state_dict()) for m in reward.members])
                            if reward is not None else None)
        detector = ({"threshold": reward.threshold, "hold": reward.hold, "spec": reward.spec.to_dict(),
                     "detector": reward.detector}
                    if reward is not None else {})
        remote = rt.remote(num_cpus=1, max_restarts=-1, max_task_retries=0, scheduling_strategy=scheduling)(RobotHost)
        self.sizes: list[int] = []
        self.actors = []
        offset = 0
        while offset < n_robots:
            k = min(robots_per_actor, n_robots - offset)
            self.actors.append(remote.remote(make_env, spec, k, offset, self._reward_ref, detector, reset_free,
                                             reset_every, tuple(record_info)))
            self.sizes.append(k)
            offset += k
        self.skipped_starts = 0
        # every Ray call goes through _using(): after close() (from any thread) it raises FleetError instead
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._in_flight: list[_Collection] = []  # started, not finished: their refs are dropped on close
        rt.get([a.pid.remote() for a in self.actors], timeout=self.startup_s)  # surface start-up errors here

    def _using(self):
        """Hold the fleet for a Ray call; a closed fleet raises FleetError instead of touching Ray."""
        if self._closed.is_set():
            raise FleetError("this Ray fleet is closed (its robots are gone and Ray may be shut down); make a new "
                             "fleet to collect again")
        return self._lock

    @property
    def n_robots(self) -> int:
        return sum(self.sizes)

    def describe(self) -> dict[str, Any]:
        """Where the robots run: one entry per actor (robot ids, Ray node, process id)."""
        with self._using():
            pids = ray.get([a.pid.remote() for a in self.actors], timeout=self.startup_s)
            nodes = ray.get([a.node.remote() for a in self.actors], timeout=self.startup_s)
        actors, first = [], 0
        for k, pid, node in zip(self.sizes, pids, nodes):
            actors.append({"robots": list(range(first, first + k)), "node": node, "pid": pid})
            first += k
        return {"backend": "ray", "robots": self.n_robots, "nodes": len(set(nodes)), "actors": actors,
                "failures": self.failures}

    def _shares(self, total: int) -> list[int]:
        """Split ``total`` steps or episodes over the actors in proportion to their robots."""
        n = self.n_robots
        shares = [total * k // n for k in self.sizes]
        for j in range(total - sum(shares)):
            shares[j % len(shares)] += 1
        return shares

    def collect(self, weights: dict[str, torch.Tensor], version: int, *, seeds: Iterator[int],
                n_steps: int | None = None, n_episodes: int | None = None, temperature: float = 1.0,
                generator: torch.Generator | None = None) -> list[Episode]:
        """Collect on every actor in parallel; episodes come back in actor order."""
        with self._using():
            return self.finish(self.start(weights, version, seeds=seeds, n_steps=n_steps, n_episodes=n_episodes,
                                          temperature=temperature, generator=generator))

    def start(self, weights: dict[str, torch.Tensor], version: int, *, seeds: Iterator[int],
              n_steps: int | None = None, n_episodes: int | None = None, temperature: float = 1.0,
              generator: torch.Generator | None = None) -> "_Collection":
        """Launch a collection and return at once (the learner may train meanwhile); see ``finish``."""
        if (n_steps is None) == (n_episodes is None):
            raise ValueError("give exactly one of n_steps or n_episodes")
        with self._using():
            return self._start(weights, version, seeds, n_steps, n_episodes, temperature, generator)

    def _start(self, weights: dict[str, torch.Tensor], version: int, seeds: Iterator[int], n_steps: int | None,
               n_episodes: int | None, temperature: float, generator: torch.Generator | None) -> "_Collection":
        if version != self.version:
            self._weights_ref = ray.put(_numpy_weights(weights))
            self.version = version
        c = _Collection(self._weights_ref, version, self._shares(n_steps if n_steps is not None else n_episodes),
                        n_steps is not None, temperature)
        for j, (k, share) in enumerate(zip(self.sizes, c.shares)):
            # every started episode takes >= 1 step; detector re-draws take a few more seeds
            block = [int(next(seeds)) for _ in range(share + 4 * k + 64)]
            sample_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else j
            c.tasks.append((block, sample_seed))
        c.pending = {self._submit(j, c): (j, time.time()) for j in range(len(self.actors)) if c.shares[j] > 0}
        self._in_flight.append(c)
        return c

    def finish(self, c: "_Collection") -> list[Episode]:
        """Wait for a started collection, restarting robot actors that die or hang on the way."""
        with self._using():
            try:
                return self._finish(c)
            finally:
                if c in self._in_flight:
                    self._in_flight.remove(c)

    def _finish(self, c: "_Collection") -> list[Episode]:
        while c.pending:
            if self._closed.is_set():  # close() from another thread: stop waiting, touch Ray no more
                raise FleetError("the Ray fleet was closed while a collection was in progress")
            ready, _ = ray.wait(list(c.pending), num_returns=1, timeout=1.0)
            for ref in ready:
                j, _started = c.pending.pop(ref)
                try:
                    episodes, skipped = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the robot's own code raised: restart it
                    ray.kill(self.actors[j], no_restart=False)
                    what = f"crashed: {exc.cause!r}" if exc.cause is not None else "crashed"
                except ray.exceptions.RayError as exc:  # the actor process died or is unreachable
                    what = f"died ({type(exc).__name__})"
                else:
                    c.results[j] = episodes
                    self.skipped_starts += skipped
                    continue
                c.restarts = self._failed(j, what, c.restarts)
                c.pending[self._resubmit(j, c)] = (j, time.time())
            now = time.time()
            for ref, (j, started) in list(c.pending.items()):
                if now - started > self.timeout_s:
                    del c.pending[ref]
                    ray.kill(self.actors[j], no_restart=False)
                    c.restarts = self._failed(j, f"silent for {self.timeout_s:g} s (hung); killed", c.restarts)
                    c.pending[self._resubmit(j, c)] = (j, time.time())
        return [e for j in sorted(c.results) for e in c.results[j]]

    def _resubmit(self, j: int, c: "_Collection"):
        """Wait for Ray to restart actor ``j`` (a fresh process), then give it its share again."""
        deadline = time.time() + self.startup_s
        while True:
            if self._closed.is_set():
                raise FleetError("the Ray fleet was closed while a robot actor was restarting")
            try:
                ray.get(self.actors[j].pid.remote(), timeout=10)
                break
            except ray.exceptions.RayError as exc:
                if time.time() > deadline:
                    raise FleetError(f"robot actor {j} did not come back within {self.startup_s:g} s after a "
                                     f"failure: {exc}") from exc
                time.sleep(0.2)
        return self._submit(j, c)

    def _submit(self, j: int, c: "_Collection"):
        block, sample_seed = c.tasks[j]
        share = c.shares[j]
        return self.actors[j].collect.remote(c.weights_ref, c.version, block, share if c.by_steps else None,
                                             None if c.by_steps else share, c.temperature, sample_seed)

    def _failed(self, j: int, what: str, restarts: int) -> int:
        restarts += 1
        first = sum(self.sizes[:j])
        record = {"actor": j, "robots": list(range(first, first + self.sizes[j])), "what": what,
                  "policy_version": self.version, "time": time.time()}
        self.failures.append(record)
        log.warning("robot actor %d (robots %d-%d) %s; its episodes in progress are discarded and its share "
                    "is collected again after a restart", j, first, first + self.sizes[j] - 1, what)
        if restarts > self.max_restarts:
            raise FleetError(f"robot actors failed {restarts} times in one collection (limit fleet.max_restarts="
                             f"{self.max_restarts}); last: actor {j} {what}")
        return restarts

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the robots and, when this fleet started Ray, shut it down; safe to call twice or from any thread.

        A collection waiting in another thread notices within a second and raises FleetError; once it has
        let go (at most ``timeout_s``), the robots are killed and every reference into Ray the fleet holds
        (actors, weights, tasks in flight) is dropped and collected before ``ray.shutdown()``, so no object of
        this fleet touches Ray after it. Where another thread still holds the fleet, Ray is left running (a
        warning says so) rather than shut down under it.
        """
        self._closed.set()
        if not self._lock.acquire(timeout=timeout_s):
            log.warning("a collection in another thread still holds the Ray fleet after %g s; leaving Ray running",
                        timeout_s)
            return
        try:
            live = ray is not None and ray.is_initialized()
            for actor in self.actors if live else ():
                try:
                    ray.kill(actor, no_restart=True)
                except Exception as exc:  # noqa: BLE001 - a dead actor or node: nothing left to stop
                    log.debug("could not kill a robot actor: %s", exc)
            for c in self._in_flight:  # tasks in flight on the killed actors: their results are never read
                c.pending.clear()
                c.weights_ref = None
            self._in_flight.clear()
            self.actors, self._weights_ref, self._reward_ref = [], None, None
            gc.collect()  # references in cycles are released now, while Ray is up, not by a later collection
            if live and self._owns_ray:
                self._owns_ray = False
                ray.shutdown()
        finally:
            self._lock.release()
