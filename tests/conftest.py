import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from selfimprove.config import RunConfig, load_config  # noqa: E402


def quick_config(tmp_path, *overrides: str) -> RunConfig:
    """The tiny point-mass preset writing under ``tmp_path``."""
    return load_config("pointmass-quick", [f"runs_dir={tmp_path}", *overrides])


@pytest.fixture(scope="session")
def trained_quick(tmp_path_factory):
    """A quick run with demos and an SFT checkpoint, shared by tests that only read it."""
    from selfimprove.data.collect import collect_demos
    from selfimprove.train.sft import sft

    config = quick_config(tmp_path_factory.mktemp("runs"), "name=shared")
    collect_demos(config, progress=False)
    sft(config, progress=False)
    return config
