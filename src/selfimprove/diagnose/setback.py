"""The steps-to-go distribution through a setback (the paper's multimodality figure).

When a domain says how to spot a setback in an episode (``Domain.setback``: the Aloha peg dropped
after it was lifted), the diagnostics take the first policy rollout with one and plot the reward
model's whole distribution over steps-to-go at every frame: the paper saw it turn multimodal when
the peg fell (done soon, or a long way off) and narrow again after the recovery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfimprove.data.episode import Episode
from selfimprove.domain_table import resolve
from selfimprove.domains import domain
from selfimprove.model.inputs import from_episodes
from selfimprove.model.policy import EmbodiedModel
from selfimprove.runlog import write_figure


def recorded_info(name: str) -> tuple[str, ...]:
    """The env info keys domain ``name`` needs kept per frame to find setbacks (none without a setback)."""
    entry = domain(name)
    return tuple(entry.setback_info) if entry is not None and entry.setback else ()


def find_setback(name: str, episodes: list[Episode]) -> tuple[Episode, int] | None:
    """The first episode with a setback and the frame it happens at, or None."""
    entry = domain(name)
    if entry is None or not entry.setback:
        return None
    spot = resolve(entry.setback)
    for episode in episodes:
        t = spot(episode)
        if t is not None:
            return episode, int(t)
    return None


@torch.no_grad()
def distribution(model: EmbodiedModel, episode: Episode) -> np.ndarray:
    """[frames, classes] the steps-to-go probabilities on every frame of ``episode``."""
    source, _ = from_episodes([episode], model.spec)
    rows = torch.arange(episode.length + 1)
    return torch.softmax(model.steps_to_go_distribution(source.obs(rows)).float(), dim=-1).numpy()


def plot_setback(model: EmbodiedModel, name: str, episodes: list[Episode], out: Path) -> dict[str, Any] | None:
    """``out/setback.png`` for the first rollout with a setback; what it shows, or None when none has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = find_setback(name, episodes)
    if found is None:
        return None
    episode, t = found
    probs = distribution(model, episode)
    values = model.stg_values.numpy()
    expected = probs @ values
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.imshow(probs.T, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
              extent=(-0.5, len(probs) - 0.5, values[0] - 0.5, values[-1] + 0.5))
    ax.plot(np.arange(len(probs)), expected, color="cyan", lw=1.2, label="expected d")
    ax.axvline(t, color="white", ls="--", lw=1, label=f"setback (step {t})")
    ax.set_xlabel("step of the episode")
    ax.set_ylabel("steps to go")
    ax.set_title(f"Steps-to-go distribution through a setback (eval seed {episode.meta.get('seed')})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    write_figure(fig, out / "setback.png", dpi=110)
    plt.close(fig)
    peaks = [int(np.sum((p[1:-1] > p[:-2]) & (p[1:-1] > p[2:]) & (p[1:-1] > 0.05))) for p in probs]
    return {"file": "setback.png", "seed": episode.meta.get("seed"), "step": t, "length": episode.length,
            "success": bool(episode.true_success), "modes_before": float(np.mean(peaks[:t])) if t else None,
            "modes_after": float(np.mean(peaks[t:t + 10]))}
