"""The documentation matches the code: the generated config reference, its examples, and every relative link."""

import dataclasses
import json
import re
import shlex
import typing
from pathlib import Path

import pytest

from selfimprove.cli import build_parser, config_from_args
from selfimprove.config import RunConfig
from selfimprove.config_reference import config_reference_markdown
from selfimprove.experiment import available_experiments, load_experiment, plan_experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PAGE = ROOT / "docs" / "config.md"
EXPERIMENTS_PAGE = ROOT / "docs" / "experiments.md"
REGENERATE = "python -m selfimprove.config_reference > docs/config.md"


def _leaf_fields(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted names of every non-dataclass field of RunConfig and of its section dataclasses."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_config_page_is_generated_from_the_code():
    committed = CONFIG_PAGE.read_text() if CONFIG_PAGE.exists() else ""
    assert committed == config_reference_markdown(), (
        f"docs/config.md is out of date with src/selfimprove/config.py (or configs/); regenerate it: {REGENERATE}")


def test_every_config_field_has_a_description_in_the_page():
    rows = {}
    for line in CONFIG_PAGE.read_text().splitlines():
        match = re.match(r"^\| `([\w.]+)` \| `[^`]*` \| `[^`]*` \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    fields = _leaf_fields()
    assert len(fields) > 50
    missing = [name for name in fields if name not in rows]
    assert not missing, f"fields without a row in docs/config.md: {missing}; regenerate it: {REGENERATE}"
    empty = [name for name in fields if len(rows[name]) < 8]
    assert not empty, (f"fields without a description: {empty}; add an inline `# ...` comment to the field in "
                       f"src/selfimprove/config.py, then regenerate: {REGENERATE}")
    for section in {name.split(".")[0] for name in fields if "." in name}:
        assert f"## `[{section}]`" in CONFIG_PAGE.read_text()


def test_config_page_examples_load(tmp_path, monkeypatch):
    """The page's preset file and command lines give the configs they say they give."""
    text = CONFIG_PAGE.read_text()
    (toml,) = _fenced_blocks(text, "toml")
    (tmp_path / "pm-small.toml").write_text(toml)
    monkeypatch.chdir(tmp_path)
    commands = [line for block in _fenced_blocks(text, "bash") for line in block.splitlines()
                if line.startswith("selfimprove ")]
    assert len(commands) >= 3
    configs = [config_from_args(build_parser().parse_args(shlex.split(line)[1:])) for line in commands]
    small = configs[0]
    assert small.name == "pm-small" and small.model.hidden == 128 and small.improve.success_threshold is None
    assert small.improve.lr == 3e-4 and small.seed == 2  # --set wins over the file
    assert small.data.episodes == 5000  # from configs/pointmass.toml, which the file extends
    quick = configs[1]
    assert quick.name == "pointmass-quick" and quick.fleet.robots == 8 and quick.improve.success_threshold == 2.5
    assert configs[2].sft.augment == ["mirror"] and configs[2].env.kwargs == {"image_size": 32}


def test_experiment_file_example_plans_as_described(tmp_path):
    (toml,) = _fenced_blocks(EXPERIMENTS_PAGE.read_text(), "toml")
    path = tmp_path / "my-grid.toml"
    path.write_text(toml)
    plan = plan_experiment(load_experiment(str(path)), tmp_path)
    assert (len(plan.cells), len(plan.runs), len(plan.groups)) == (12, 24, 3)
    assert "lr3e-4_ppo_seed1" in plan.runs and plan.runs["lr3e-4_ppo_seed1"].config.improve.objective == "ppo"
    assert plan.runs["lr3e-4_ppo_seed1_const"].config.improve.reward == "constant"
    assert plan.spec.report == {"kind": "ablation", "rows": "lr", "columns": "objective"}


def test_shipped_experiments_tables_match_their_plans(tmp_path):
    """Every experiment in configs/experiments/ is in the page with the cells, runs and SFT count it expands to."""
    counts = {}
    for line in EXPERIMENTS_PAGE.read_text().splitlines():
        match = re.match(r"^\| `([\w-]+)` \|(?:[^|]*\|){0,2} (\d+) \| (\d+) \| (\d+)\b", line)
        if match:
            counts[match.group(1)] = tuple(int(match.group(i)) for i in (2, 3, 4))
    assert sorted(counts) == available_experiments(), "add the new experiment to docs/experiments.md"
    for name, documented in counts.items():
        plan = plan_experiment(load_experiment(name), tmp_path)
        assert documented == (len(plan.cells), len(plan.runs), len(plan.groups)), name


_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _relative_links(path: Path) -> list[str]:
    """Targets of Markdown links and images outside code blocks and code spans, without URLs and anchors."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(page):
    broken = [t for t in _relative_links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_link_checker_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](a.md) ![img](pics/b.png \"title\") [web](https://x.org) [top](#top) [c](c.md#part)\n"
                    "`[not](inline.md)`\n```\n[not](fenced.md)\n```\n")
    assert _relative_links(page) == ["a.md", "pics/b.png", "c.md"]


def test_committed_results_hold_no_absolute_paths_and_name_their_code():
    """docs/results/*.json: every path relative (to the project), and a provenance record; results made before
    it was recorded say so instead of naming a commit that did not make them."""
    results = sorted((ROOT / "docs" / "results").glob("*.json"))
    assert results
    for path in results:
        summary = json.loads(path.read_text())
        strings = []
        stack = [summary]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
            elif isinstance(value, str):
                strings.append(value)
        assert not [s for s in strings if s.startswith("/") or s.startswith("~")], path
        assert (ROOT / summary["config_file"]).is_file(), path
        code = summary["provenance"]
        assert "commit" in code and (code["commit"] is not None or "note" in code), path


def test_provenance_outside_a_git_checkout_is_none_not_an_error(tmp_path, monkeypatch):
    from selfimprove import provenance

    provenance.git_state.cache_clear()
    monkeypatch.setattr(provenance, "_CHECKOUT", tmp_path)
    try:
        code = provenance.provenance("bfloat16")
    finally:
        provenance.git_state.cache_clear()
    assert code["commit"] is None and code["dirty"] is None and code["selfimprove"]
    assert code["precision"] == {"setting": "bfloat16", "gradient_steps": "bfloat16 autocast"}
