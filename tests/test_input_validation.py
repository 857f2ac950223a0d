"""Bad input never loses data and always gets a clear error (the library's own class, naming the fix).

Table-driven: each case is the call, the error class and a piece of its message. Store cases also
check that every file of the store is byte-identical after the failed call.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from selfimprove.data.episode import Episode
from selfimprove.data.lerobot import dataset_info
from selfimprove.data.store import EpisodeStore, EpisodeWriter
from selfimprove.domains import check_store
from selfimprove.envs.instructions import instruction_problem, task_problem
from selfimprove.errors import DatasetError, InputError, SelfImproveError
from selfimprove.model.inputs import FrameSource, from_histories
from selfimprove.model.policy import EmbodiedModel, ModelSpec

GOOD = "push the red moon to the blue cube"


# -- tiny stores --------------------------------------------------------------------------------------

def _pointmass_episode(seed: int, instruction: str, length: int = 4) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(observations={"state": rng.normal(size=(length + 1, 6)).astype(np.float32)},
                   actions=rng.uniform(-1, 1, size=(length, 2)).astype(np.float32), instruction=instruction,
                   true_success=True, meta={"seed": seed})


def _tabletop_episode(seed: int, instruction: str, length: int = 3) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(observations={"image": rng.integers(0, 255, size=(length + 1, 8, 8, 3), dtype=np.uint8),
                                 "effector": rng.normal(size=(length + 1, 2)).astype(np.float32),
                                 "effector_target": rng.normal(size=(length + 1, 2)).astype(np.float32)},
                   actions=rng.uniform(-0.1, 0.1, size=(length, 2)).astype(np.float32), instruction=instruction,
                   true_success=True, meta={"seed": seed})


def _store(root: Path, make, instructions: list[str], flush_every: int = 10_000) -> Path:
    with EpisodeWriter(root, flush_every=flush_every) as writer:
        writer.extend(make(i, t) for i, t in enumerate(instructions))
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damaged(tmp: Path, damage: str) -> Path:
    root = _store(tmp / "store", _pointmass_episode, ["move the point to the goal"] * 6, flush_every=3)
    if damage == "truncated data file":
        _truncate(root / "data/chunk-000/file-001.parquet")
    elif damage == "truncated episodes file":
        _truncate(root / "meta/episodes/chunk-000/file-000.parquet")
    elif damage == "missing data file":
        (root / "data/chunk-000/file-001.parquet").unlink()
    return root


STORE_CASES = [
    # (id, store builder, call, expected error, message piece)
    ("empty pointmass instruction",
     lambda tmp: _store(tmp / "s", _pointmass_episode, ["move the point to the goal", ""]),
     lambda root: check_store(EpisodeStore(root), "pointmass"), DatasetError, "task 1 '' cannot train a pointmass"),
    ("blank language-table instruction",
     lambda tmp: _store(tmp / "s", _tabletop_episode, [GOOD, "   "]),
     lambda root: check_store(EpisodeStore(root), "language-table"), DatasetError, "give every episode a non-empty"),
    ("two blank instructions",
     lambda tmp: _store(tmp / "s", _tabletop_episode, ["", "  ", GOOD]),
     lambda root: check_store(EpisodeStore(root), "language-table"), DatasetError,
     "(2 of its 3 instructions are invalid)"),
    ("point-mass store, tabletop config",
     lambda tmp: _store(tmp / "s", _pointmass_episode, ["move the point to the goal"] * 2),
     lambda root: check_store(EpisodeStore(root), "language-table"), DatasetError,
     "holds pointmass episodes (observations {'state': [6]}) but the config is 'language-table'"),
    ("tabletop store, point-mass config",
     lambda tmp: _store(tmp / "s", _tabletop_episode, [GOOD] * 2),
     lambda root: check_store(EpisodeStore(root), "pointmass"), DatasetError,
     "holds language-table episodes"),
    ("info on a truncated data file", lambda tmp: _damaged(tmp, "truncated data file"), dataset_info, DatasetError,
     "file-001.parquet is truncated or corrupt"),
    ("info on a truncated episodes file", lambda tmp: _damaged(tmp, "truncated episodes file"), dataset_info,
     DatasetError, "meta/episodes/chunk-000/file-000.parquet is truncated or corrupt"),
    ("info on a missing data file", lambda tmp: _damaged(tmp, "missing data file"), dataset_info, DatasetError,
     "its 1 data files hold 15 frames but meta/info.json says total_frames = 30"),
]


@pytest.mark.parametrize("build, call, error, message", [c[1:] for c in STORE_CASES],
                         ids=[c[0] for c in STORE_CASES])
def test_bad_store_raises_a_clear_error_and_changes_no_byte(tmp_path, build, call, error, message):
    root = build(tmp_path)
    before = _hashes(root)
    with pytest.raises(error) as raised:
        call(root)
    assert message in str(raised.value)
    assert isinstance(raised.value, SelfImproveError)
    assert _hashes(root) == before


@pytest.mark.parametrize("make, instructions, domain", [
    (_pointmass_episode, ["move the point to the goal"], "pointmass"),
    (_tabletop_episode, [GOOD, "move the yellow star to the top left corner", "separate the red moon from the group",
                         "push the banana to the center"], "language-table"),
    (_pointmass_episode, ["reach the target"], "reach"),  # a domain of your own takes any non-empty text
], ids=["pointmass", "language-table", "own domain"])
def test_sound_stores_pass_and_dataset_info_accepts_them(tmp_path, make, instructions, domain):
    root = _store(tmp_path / "s", make, instructions, flush_every=2)
    check_store(EpisodeStore(root), domain)
    summary = dataset_info(root)
    assert summary["episodes"] == len(instructions)
    assert summary["tasks"] == sorted(set(instructions), key=instructions.index)


FREE_FORM = ["get the yellow star close to the yellow pentagon", "push the purple moon to the blue cube",
             "push the red banana to the blue cube", "fly to the moon", "Bitte den roten Mond zum blauen Würfel!"]


def test_a_store_of_free_form_instructions_passes_with_a_warning(tmp_path, caplog):
    """Paraphrases, unknown words, another language: the model trains on them; only the simulator, which
    scores tasks of its own, has a grammar. The warning says how many are outside it."""
    root = _store(tmp_path / "s", _tabletop_episode, [GOOD, *FREE_FORM])
    with caplog.at_level("WARNING"):
        check_store(EpisodeStore(root), "language-table")
    assert f"5 of its 6 instructions (e.g. {FREE_FORM[0]!r}) are outside the language-table task grammar" in caplog.text


def test_dataset_info_reads_only_footers_of_a_lerobot_dataset():
    tiny = Path(__file__).parent / "data" / "lerobot_v3_tiny"
    assert dataset_info(tiny)["frames"] == 12


def test_truncated_store_fails_the_cli_with_exit_code_2(tmp_path, capsys):
    from selfimprove.cli import main

    root = _damaged(tmp_path, "truncated data file")
    assert main(["dataset", "info", str(root)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


# -- the model's inputs -------------------------------------------------------------------------------

TABLETOP = ModelSpec(domain="language-table", obs_shapes={"image": [8, 8, 3], "effector": [2]},
                     action_low=[-0.1, -0.1], action_high=[0.1, 0.1], action_bins=5, max_steps=10, hidden=16,
                     layers=1, encoder="film", frames=2, channels=[4])
POINTMASS = ModelSpec(domain="pointmass", obs_shapes={"state": [6]}, action_low=[-1, -1], action_high=[1, 1],
                      action_bins=5, max_steps=10, hidden=16, layers=1)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"language-table": EmbodiedModel(TABLETOP).eval(), "pointmass": EmbodiedModel(POINTMASS).eval()}


def _tabletop_batch(n: int = 2, **changes) -> dict:
    obs = {"image": torch.zeros(n, 2, 8, 8, 3, dtype=torch.uint8), "effector": torch.zeros(n, 2),
           "instruction": [GOOD] * n}
    return {**obs, **changes}


def _pointmass_batch(n: int = 3, **changes) -> dict:
    return {"state": torch.zeros(n, 6), "instruction": ["move the point to the goal"] * n, **changes}


MODEL_CASES = [
    # (id, domain, observations, message piece); every one raises InputError before the network runs
    ("grayscale frame, 1 channel", "language-table",
     _tabletop_batch(image=torch.zeros(2, 2, 8, 8, 1, dtype=torch.uint8)), "a grayscale frame has 1 channel"),
    ("grayscale frame, no channel axis", "language-table",
     _tabletop_batch(image=torch.zeros(2, 2, 8, 8, dtype=torch.uint8)), "a grayscale frame has no colour axis"),
    ("frame of another size", "language-table",
     _tabletop_batch(image=torch.zeros(2, 2, 16, 16, 3, dtype=torch.uint8)), "resize each frame to 8x8"),
    ("channels-first frame", "language-table",
     _tabletop_batch(image=torch.zeros(2, 2, 3, 8, 8, dtype=torch.uint8)), "frame.transpose(1, 2, 0)"),
    ("another number of frames", "language-table",
     _tabletop_batch(image=torch.zeros(2, 3, 8, 8, 3, dtype=torch.uint8)), "stack the last 2 frame(s)"),
    ("float frame", "language-table", _tabletop_batch(image=torch.zeros(2, 2, 8, 8, 3)), "uint8 RGB in 0..255"),
    ("vector of another length", "language-table", _tabletop_batch(effector=torch.zeros(2, 3)),
     "'effector' has shape [2, 3] but the model takes [batch, 2]"),
    ("missing observation", "language-table", {"image": torch.zeros(2, 2, 8, 8, 3, dtype=torch.uint8),
                                               "instruction": [GOOD] * 2}, "the observations lack 'effector'"),
    ("numpy instead of a tensor", "language-table", _tabletop_batch(effector=np.zeros((2, 2), np.float32)),
     "not a torch tensor"),
    ("rows disagree", "language-table", _tabletop_batch(effector=torch.zeros(3, 2)), "holds 3 rows but the others"),
    ("one instruction for two rows", "language-table", _tabletop_batch(instruction=[GOOD]),
     "1 instructions for a batch of 2"),
    ("no instruction for the film trunk", "language-table",
     {"image": torch.zeros(2, 2, 8, 8, 3, dtype=torch.uint8), "effector": torch.zeros(2, 2)},
     "the observations lack 'instruction'"),
    ("instruction as one string", "language-table", _tabletop_batch(instruction=GOOD), "must be a list of strings"),
    ("empty instruction", "language-table", _tabletop_batch(instruction=[GOOD, ""]), "it is empty"),
    ("blank instruction", "language-table", _tabletop_batch(instruction=[GOOD, " \n"]), "it is empty"),
    ("instruction that is not text", "language-table", _tabletop_batch(instruction=[GOOD, 3]), "it is int, not text"),
    ("instruction that is None", "language-table", _tabletop_batch(instruction=[None, GOOD]), "it is NoneType"),
    ("point mass: state of another length", "pointmass", _pointmass_batch(state=torch.zeros(3, 4)),
     "'state' has shape [3, 4] but the model takes [batch, 6]"),
    ("point mass: empty instruction", "pointmass", _pointmass_batch(instruction=["", "", ""]), "it is empty"),
    ("point mass: not a dict", "pointmass", torch.zeros(3, 6), "takes a dict of observations"),
]


@pytest.mark.parametrize("domain, obs, message", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model_input_raises_input_error_naming_the_fix(models, domain, obs, message):
    model = models[domain]
    for call in (model, model.expected_steps_to_go):
        with pytest.raises(InputError) as raised:
            call(obs)
        assert message in str(raised.value)
        assert isinstance(raised.value, ValueError) and raised.value.__cause__ is None


def test_good_inputs_run_with_and_without_an_instruction_for_the_mlp(models):
    with torch.no_grad():
        assert models["language-table"](_tabletop_batch())[0].shape == (2, 2, 5)
        assert models["pointmass"](_pointmass_batch())[1].shape == (3, 11)
        assert models["pointmass"]({"state": torch.zeros(3, 6)})[1].shape == (3, 11)  # the mlp ignores the text
    with torch.no_grad():  # any non-empty text: paraphrases, unknown words, another language
        for text in FREE_FORM:
            for encoder in ("hashed_roles", "hashed_bow"):
                model = EmbodiedModel(ModelSpec(**{**TABLETOP.to_dict(), "text_encoder": encoder})).eval()
                logits, stg = model(_tabletop_batch(instruction=[text, GOOD]))
                assert torch.isfinite(logits).all() and torch.isfinite(stg).all()
                assert torch.isfinite(model.expected_steps_to_go(_tabletop_batch(instruction=[text, text]))).all()
    one_frame = ModelSpec(**{**TABLETOP.to_dict(), "frames": 1})
    with torch.no_grad():  # one frame may come without its frame axis, as the trunks accept
        EmbodiedModel(one_frame)(_tabletop_batch(image=torch.zeros(2, 8, 8, 3, dtype=torch.uint8)))


def _robot(image_shape=(8, 8, 3), effector=2) -> dict:
    return {"image": np.zeros(image_shape, np.uint8), "effector": np.zeros(effector, np.float32)}


HISTORY_CASES = [
    ("grayscale frame of robot 1", [[_robot()], [_robot((8, 8))]], [GOOD] * 2,
     "robot 1's observation 'image' has shape [8, 8] but the model takes [8, 8, 3] uint8: a grayscale frame"),
    ("an older grayscale frame", [[_robot((8, 8, 1)), _robot()]], [GOOD],
     "robot 0's observation 'image' has shape [8, 8, 1]"),
    ("effector of another length", [[_robot()], [_robot(effector=3)]], [GOOD] * 2,
     "robot 1's observation 'effector' has shape [3] but the model takes [2]"),
    ("missing observation", [[{"image": np.zeros((8, 8, 3), np.uint8)}]], [GOOD],
     "robot 0's observation lacks 'effector'"),
    ("instructions do not match the robots", [[_robot()], [_robot()]], [GOOD], "1 instructions for 2 robots"),
    ("robot without observations", [[]], [GOOD], "reset it before asking the model"),
]


@pytest.mark.parametrize("histories, instructions, message", [c[1:] for c in HISTORY_CASES],
                         ids=[c[0] for c in HISTORY_CASES])
def test_live_robot_inputs_name_the_robot(histories, instructions, message):
    with pytest.raises(InputError) as raised:
        from_histories(histories, instructions, TABLETOP)
    assert message in str(raised.value)


def test_frame_source_checks_its_frames_and_instructions_once():
    arrays = {"image": torch.zeros(4, 8, 8, 3, dtype=torch.uint8), "effector": torch.zeros(4, 2)}
    index = torch.arange(4)
    FrameSource(arrays, index, torch.zeros(4, dtype=torch.long), [GOOD], TABLETOP)
    FrameSource(arrays, index, torch.zeros(4, dtype=torch.long), ["push the purple moon to the red moon"], TABLETOP)
    with pytest.raises(InputError, match="it is empty"):
        FrameSource(arrays, index, torch.zeros(4, dtype=torch.long), [""], TABLETOP)
    with pytest.raises(InputError, match="a grayscale frame has 1 channel"):
        FrameSource({**arrays, "image": torch.zeros(4, 8, 8, 1, dtype=torch.uint8)}, index,
                    torch.zeros(4, dtype=torch.long), [GOOD], TABLETOP)


def test_every_instruction_the_tabletop_generates_and_augments_is_accepted():
    from selfimprove.domains.tabletop import mirror_instruction
    from selfimprove.envs.tabletop.tasks import all_banana2location_instructions, all_block2block_instructions, \
        all_block2location_instructions

    texts = all_block2block_instructions() + all_block2location_instructions() + all_banana2location_instructions()
    texts += [mirror_instruction(t) for t in texts]
    texts += [t.replace("red", "tmp").replace("blue", "red").replace("tmp", "blue") for t in texts]  # recolour
    assert [t for t in texts if task_problem("language-table", t)] == []  # the simulator can score each
    assert "unknown task" in task_problem("language-table", FREE_FORM[0])
    assert instruction_problem("language-table", FREE_FORM[0]) is None  # and the model reads it
    assert task_problem("reach", "anything at all") is None
    assert "empty" in instruction_problem("reach", " ")


def test_shape_checks_add_microseconds_not_milliseconds():
    import time

    from selfimprove.model.inputs import check_inputs

    obs = _tabletop_batch(256)
    check_inputs(TABLETOP, obs)
    start = time.perf_counter()
    for _ in range(200):
        check_inputs(TABLETOP, obs)
    assert (time.perf_counter() - start) / 200 < 1e-3
