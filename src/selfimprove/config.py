"""Run configuration: dataclasses, named presets from ``configs/``, strict loading.

A config is plain data. Presets are TOML files; command-line overrides are ``section.field=value``
strings. Unknown keys and wrong types fail loudly with a suggestion, because a typo in a robot
learning config otherwise silently runs the wrong experiment for hours. Value ranges are checked
by ``config_checks.py`` whenever a config is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfimprove.config_checks import check_config
from selfimprove.errors import ConfigError

def _preset_dir() -> Path:
    """``configs/`` of the source checkout, else the copy inside the installed package, else ./configs."""
    candidates = [Path(__file__).resolve().parents[2] / "configs", Path(__file__).resolve().parent / "presets"]
    for candidate in candidates + [Path.cwd() / "configs"]:
        if candidate.is_dir() and any(candidate.glob("*.toml")):
            return candidate
    return Path.cwd() / "configs"


PRESET_DIR = _preset_dir()


@dataclass
class EnvConfig:
    """Which gymnasium environment the robots live in."""

    id: str = "selfimprove/PointMass-v0"  # gymnasium id: selfimprove/PointMass-v0, selfimprove/Tabletop-*-v0, or yours
    max_episode_steps: int = 100  # time limit of every episode (demos, practice, eval); <= model.max_steps
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the env, e.g. {image_size = 64}
    module: str = ""  # imported before gym.make so it can register env.id (e.g. "my_robot.envs"); empty: none


@dataclass
class DataConfig:
    """The demonstration dataset and which part of it Stage 1 sees."""

    episodes: int = 10_000  # successful expert demos to collect; failed attempts are re-drawn
    path: str = ""  # episode store that SFT trains on and Stage 2 calibrates s on; empty: runs/<name>/demos
    fraction: float = 1.0  # deterministic nested subset of the training split (0.1, 0.2, 0.8, ...)
    val_fraction: float = 0.05  # held-out episodes, never trained on
    expert_waypoints: int = 5  # point mass: random waypoints the expert visits first
    expert_noise: float = 0.003  # tabletop: expert action noise (m); aloha: joint-target noise (rad)
    expert_detour_prob: float = 0.02  # tabletop: chance per step of a short detour
    expert_hysteresis: bool = True  # tabletop: the expert's push / walk-round switch remembers its mode (the original oracle's); false: decided by the current state alone, so every label is a function of what the policy sees
    expert_labels: str = "executed"  # the demo's action labels: "executed" (what the expert sent, noise and detours included) or "intended" (what it meant: noise and detours only move the board, as in DART; tabletop)
    collect_workers: int = 1  # processes that collect demos in parallel
    hold_steps: int = 0  # demos go on this many still steps past the goal (labelled 0 steps to go), so the goal is seen for longer


@dataclass
class ModelConfig:
    """The embodied model: one trunk, a BC head over action tokens, a steps-to-go head."""

    hidden: int = 256  # width of the trunk's MLP layers (and of the instruction projection of "film")
    layers: int = 3  # MLP layers of the trunk (after the conv stack or the VLM of "film", "late_fusion", "hf")
    action_bins: int = 21  # uniform bins per action dimension
    action_decoder: str = "independent"  # "independent" (one categorical per dimension), "autoregressive" (each dimension given the ones before) or "joint" (one categorical over all bin combinations; small action spaces)
    max_steps: int = 100  # steps-to-go classes 0..max_steps; must cover the longest demo
    dropout: float = 0.0  # encoder "mlp": dropout after each MLP layer (the other trunks have none)
    encoder: str = "mlp"  # "mlp" (vectors), "film" (frames + instruction), "late_fusion" (ablation), "hf" (HF VLM)
    frames: int = 1  # latest camera frames the model sees
    image_init: str = "scratch"  # "scratch" or "pretrained" (frozen ImageNet MobileNetV2 stem)
    text_encoder: str = "hashed_roles"  # "hashed_roles" (trainable, role-aware), "hashed_bow" (its order-blind predecessor) or "minilm" (pretrained, frozen)
    channels: list[int] = field(default_factory=lambda: [32, 64, 64, 64])  # "film", "late_fusion": channels per conv layer
    hf_model: str = ""  # encoder "hf": local folder or hub id (docs/hf_backbones.md)
    hf_dtype: str = "auto"  # encoder "hf": "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16" or "float32"
    hf_device: str = "auto"  # encoder "hf": where the VLM runs: "auto" (CUDA when present), "cpu" or "cuda"
    hf_train: str = "all"  # encoder "hf": what learns: "all", "language" (vision tower frozen), "heads" (VLM frozen)
    hf_batch_size: int = 64  # encoder "hf": observations per VLM forward pass (larger batches run in chunks)


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning with BC + steps-to-go losses summed."""

    steps: int = 4000  # gradient steps
    batch_size: int = 256  # frames per gradient step, drawn at random from the training split
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    stg_weight: float = 1.0  # weight of the steps-to-go loss in the sum
    bc_at_goal: bool = True  # False: no BC loss on demo frames at or past the goal (data.hold_steps' still steps; the policy learns to reach the goal, not to stop near it); the steps-to-go head still learns them
    negatives: float = 0.0  # mismatched-instruction negatives per batch row (0.25: 16 more rows per 64), trained to a "never" steps-to-go class; 0: none
    augment: list[str] = field(default_factory=list)  # tabletop: "mirror", "shift", "flip", "recolour" (each on half of a batch)
    keep_best: bool = True  # the final checkpoint is the eval point with the lowest held-out loss
    eval_every: int = 500  # steps between held-out loss evaluations (a metrics.jsonl line; keep_best picks among them)
    checkpoint_every: int = 1000  # steps between resumable training states (checkpoints/sft_state)


@dataclass
class ImproveConfig:
    """Stage 2: self-improvement with REINFORCE (or PPO) on the frozen model's steps-to-go reward."""

    iterations: int = 40  # collect-then-update iterations; max_robot_episodes may stop Stage 2 sooner
    steps_per_iteration: int = 2048  # env steps that fill one on-policy batch
    minibatch_size: int = 64  # samples (env steps) per learner gradient step (0: the whole batch, one step per epoch); shuffled each epoch
    objective: str = "reinforce"  # "reinforce" (the paper's), "ppo" (clipped ratio of the whole action) or "ppo_token" (one clipped ratio per action token; train/objectives.py)
    ppo_clip: float = 0.2  # ppo: eps of the clip range [1 - eps, 1 + eps] of pi / pi_old
    epochs: int | None = None  # passes over each batch; None: 1 for reinforce (the paper's), 4 for ppo
    lr: float = 3e-4  # Adam learning rate of the policy
    gamma: float = 0.9  # discount of the Monte Carlo return R_t
    loss_scale: float = 5e-2  # c in -c * R_t * log pi(a_t | o_t, g)
    advantage: str = "return"  # "return": R_t as is (the paper's); "normalized": (R_t - batch mean) / batch std; "gae": GAE(lambda) with a learned critic on the frozen reward model's features (train/critic.py); "group": the episode's total reward minus the mean of the other attempts at the same start board (leave-one-out over improve.group_size attempts)
    gae_lambda: float = 0.95  # advantage "gae": lambda of GAE (1: Monte Carlo returns less V(o_t); 0: one-step TD errors)
    value_lr: float = 1e-3  # advantage "gae": Adam learning rate of the critic (fitted for improve.epochs passes per batch)
    group_weighting: str = "frame"  # advantage "group": "frame" (every frame's loss counts once, so long failures weigh most) or "episode" (each attempt weighs the same: its frames share mean length / length)
    practice_boards: int = 0  # 0: every start board is new; N > 0: practice cycles over N fixed boards (seeds 2e9 + seed * 1e8 on; a diagnostic of whether the learner learns at all)
    group_size: int = 1  # attempts at each start board (the same seed, reset to the same layout); > 1 with advantage "group"
    positive_only: bool = False  # train only on rows whose advantage is > 0 (a failure's actions are not pushed down; train/objectives.py)
    train: str = "all"  # what practice trains: "all" the policy, or "fusion": the fusion MLP and the action decoder only (the instruction-conditioned convs stay at SFT, so their features are computed once per frame: a far cheaper update)
    reward_clip: float = 0.0  # clip each r_t to [-reward_clip, reward_clip] before the returns; 0: no clip
    reward_steps: str = "expected"  # d of the reward r_t: "expected" (the detector's d) or "reachable" (without the "never" class: it flickers between frames)
    baseline: str = "none"  # "none", or "reward_model": subtract d(o_t) minus its past average from R_t (less noise, no bias; docs/self_improvement.md)
    baseline_decay: float = 0.9  # baseline "reward_model": decay of the past average of d (0.9: about the last 10 frames)
    kl_coef: float = 0.0  # weight of KL(pi || pi_SFT) on the batch's states (the frozen SFT policy); 0: no KL term
    kl_target: float = 0.0  # > 0: adapt kl_coef after each batch (x2 when the KL exceeds 1.5 x target, /2 below target / 1.5); 0: fixed
    success_threshold: float | None = None  # s; None: calibrate on held-out demos after SFT (threshold_rule)
    threshold_rule: str = "f1"  # calibration of s: "f1" (max F1 vs goal frames) or "precision" (largest s meeting threshold_precision on held-out demos + mismatched negatives)
    threshold_precision: float = 0.9  # threshold_rule "precision": the per-frame precision s must reach
    success_hold: int = 1  # the detector ends an episode once d <= s held for this many consecutive steps
    detector: str = "steps_to_go"  # what the success detector reads: "steps_to_go" (the paper's d <= s) or "goal_probability" (1 - P(steps-to-go = 0) <= s: the head's probability that the frame is the goal, not its expectation, whose far tail and "never" class blur near misses with the goal) or "reachable_steps_to_go" (d without the "never" class <= s); s is calibrated by threshold_rule on that score
    temperature: float = 1.0  # sampling temperature of the practising robots (the learner's log pi uses it too)
    max_grad_norm: float = 1.0  # gradient-norm clip of each minibatch step
    reward: str = "steps_to_go"  # or "steps_to_go_and_success": the shape of "true_progress" read from the frozen model, (d_t - d_{t+1}) / d_0 plus 1 on the step where the detector ends the episode; or "detected_success": 1 on the step where the frozen detector (d <= s) ends the episode, nothing else (the learned reward without its per-step shaping); or "constant": r_t = 1, the control that isolates the learned reward; or "true_success": the simulator's success (1 on the step that reaches it, where the episode ends), the upper-bound control: evaluation-only information, never on a real robot; or "true_progress": that success plus the simulator's dense progress, (g_t - g_{t+1}) / g_0 for the distance g left to the goal, a ceiling with per-step credit (domains that report g)
    reward_model: str = ""  # frozen reward model + detector checkpoint; empty: the SFT checkpoint Stage 2 starts from
    reward_ensemble: list[str] = field(default_factory=list)  # more frozen checkpoints of the same model (e.g. Stage 1 with other seeds): d is the largest of the members' (the pessimistic ensemble) for the reward and the detector, whose s is calibrated on that d
    max_robot_episodes: int = 0  # stop once this many practice episodes are used (0: no budget)
    eval_every: int = 5  # iterations between true-success checks on fixed eval seeds (diagnostic only)
    eval_episodes: int = 100  # per eval point; `selfimprove run` takes its first and last from the SFT and final evals
    guard: bool = True  # score the policy on validation boards with the frozen model; keep checkpoints/best
    guard_every: int | None = None  # iterations between guard checks; None: eval_every (0: first and last only)
    guard_episodes: int = 32  # validation episodes per guard check (robot episodes, reported apart from practice)
    max_staleness: int = 0  # policy versions an episode may lag the learner (0: on-policy; >= 1 lets a Ray
    # fleet collect the next batch while the learner updates, and makes --resume no longer bit-exact)


@dataclass
class FleetConfig:
    """Where Stage 2's robots run and how they practise (reset-free or episodic)."""

    backend: str = "local"  # "local": in this process; "ray": Ray actors on this machine or a cluster
    robots: int = 16  # robots practising together in Stage 2
    robots_per_actor: int = 0  # ray: robots that share one actor (batched inference); 0: spread over the CPUs
    address: str | None = None  # ray: join this cluster (e.g. "auto" or "10.0.0.5:6379"); None: start a local Ray
    bind_host: str = "127.0.0.1"  # ray: where a local Ray's ports bind (and its dashboard, if installed)
    timeout_s: float = 600.0  # ray: a robot actor silent this long in one collect is killed and restarted
    max_restarts: int = 3  # ray: restarts per collect before the run stops with an error
    reset_free: bool = False  # after an episode, keep the board and draw a new valid task
    reset_every: int = 0  # reset-free: a scheduled human reset every K episodes per robot (0: only when needed)
    robots_per_human: int = 10  # reset-free: robots one person supervises (for the report)


@dataclass
class EvalConfig:
    """Evaluation protocol: fixed seeds never used in training, true success from the simulator."""

    episodes: int = 200  # episodes of each final evaluation, on seeds eval.seed, eval.seed + 1, ...
    seed: int = 1_000_000  # first eval seed; training seeds are drawn far below this
    temperature: float = 1.0  # sampling temperature of evaluation, videos and guard checks; 0: greedy
    robots: int = 32  # envs stepped together in evaluation (batched inference); at most eval.episodes are used
    control_temperatures: list[float] = field(default_factory=list)  # also evaluate SFT at these (0: greedy)
    videos: int = 2  # eval episodes recorded as GIFs under runs/<name>/videos/ for the report (0: none)


@dataclass
class DiagnoseConfig:
    """Reward-model diagnostics of a frozen SFT checkpoint (``selfimprove diagnose``)."""

    rollouts: int = 50  # policy episodes on the fixed eval seeds (simulator success: diagnostics only); 0: demos only


@dataclass
class RunConfig:
    """Everything one run needs; saved beside its outputs as ``config.json``."""

    name: str = "pointmass"  # the run folder is <runs_dir>/<name>/
    domain: str = "pointmass"  # "pointmass", "language-table" or your task's name; checkpoints must match it
    seed: int = 0  # seeds demos, SFT and practice; the eval seeds (eval.seed) do not depend on it
    runs_dir: str = "runs"  # folder that holds the run folders
    torch_threads: int = 1  # torch threads per process; 1 is often fastest for small models
    precision: str = "float32"  # gradient steps: "float32", "bfloat16" (CPU autocast) or "auto" (bfloat16 where the CPU has AMX / AVX512-BF16)
    tensorboard: bool | None = None  # mirror metrics to runs/<name>/tensorboard/; None: if installed
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    improve: ImproveConfig = field(default_factory=ImproveConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def dataset_path(self) -> Path:
        return Path(self.data.path) if self.data.path else self.run_dir / "demos"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Check value ranges that types alone cannot (``config_checks.check_config``); returns self for chaining.

        Runs whenever a config is built (presets, overrides, a run's ``config.json``), so a bad value
        fails before any demo is collected or any step is trained.
        """
        check_config(self)
        return self


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` to ``annotation`` (TOML/JSON/CLI values), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be None")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of fields, got {value!r}")
        return _from_dict(annotation, value, where)
    if origin is list:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: expected a list such as [32, 64], got {value!r}") from exc
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: expected a JSON object, got {value!r}") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown config key {where + '.' if where else ''}{key!r}.{hint} Known keys: {', '.join(sorted(known))}"
    )


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(key, names, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a validated RunConfig from nested plain data (unknown keys raise ConfigError)."""
    return _from_dict(RunConfig, data).validate()


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def read_toml(path: Path, what: str, find_base: typing.Callable[[str], Path],
              chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML file (a preset, an experiment) as a dict, merged over the one its ``extends`` names.

    ``extends`` is a name (``find_base(name)`` finds its file: a preset, an experiment) or a ``.toml`` path,
    read from this file's own folder when relative (not from the current folder). A file that extends
    itself, directly or through others, is a ConfigError naming the cycle, as is invalid TOML or a file
    that cannot be read.
    """
    path = Path(path)
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in (*chain, here))
        raise ConfigError(f"{what} {path} extends itself ({cycle}); remove the `extends` that closes the cycle")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{what} {path}: `extends` must name a preset or a .toml file, got {base!r}")
    if base.endswith(".toml"):
        base_path = Path(base).expanduser()
        base_path = base_path if base_path.is_absolute() else path.parent / base_path
        if not base_path.is_file():
            raise ConfigError(f"{what} {path} extends {base!r}, but there is no file {base_path} (a relative "
                              "`extends` is read from the folder of the file that names it)")
    else:
        base_path = find_base(base)
    return _merge(read_toml(base_path, what, find_base, (*chain, here)), data)


def _preset_path(name: str) -> Path:
    """The file of the preset ``name`` in ``configs/`` (ConfigError with the presets there when unknown)."""
    preset = PRESET_DIR / f"{name}.toml"
    if not preset.exists():
        known = available_presets()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset or config file {name!r}.{hint} Presets: {', '.join(known)}")
    return preset


def _preset_dict(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (or is not a file); give a .toml file or a "
                              f"preset name: {', '.join(available_presets())}")
        return read_toml(path, "config file", _preset_path)
    return read_toml(_preset_path(name_or_path), "config file", _preset_path)


def parse_override(text: str) -> dict[str, Any]:
    """``"improve.lr=1e-4"`` -> ``{"improve": {"lr": "1e-4"}}`` (types are coerced later)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value, e.g. improve.lr=1e-4")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value.strip()
    return out


def load_config(preset: str = "pointmass", overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load a named preset (or a TOML path) and apply overrides; unknown keys raise ConfigError."""
    data = _preset_dict(preset)
    if isinstance(overrides, dict):
        data = _merge(data, overrides)
    else:
        for item in overrides or []:
            data = _merge(data, parse_override(item))
    return config_from_dict(data)

