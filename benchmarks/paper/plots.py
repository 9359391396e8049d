"""The report's PNGs: dev learning curves per method for one task, and the spread of test scores over seeds.

curves_png(runs, "fewshot", "cluewsc", path)   # dev score vs optimisation step: mean over seeds, min-max band
spread_png(runs, "fewshot", tasks, path)        # one panel per task: every seed's test score per method
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import grid  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from measures import curve, majority, score  # noqa: E402

COLORS = {
    "ptuning_v2_lr": "#17becf",
    "fl": "#d62728",
    "ptuning_v2": "#1f77b4",
    "prompt_tuning": "#9467bd",
    "lora": "#2ca02c",
    "finetune": "#7f7f7f",
}


def curves_png(runs: dict, setting: str, task: grid.Task, path: Path) -> bool:
    """Dev score (points) against optimisation step, one line per method (mean over the seeds that reached each
    step) with a min-max band over seeds. Returns False (and writes nothing) when no run of the task has a curve."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for method in grid.METHODS.values():
        group = [r for r in runs.get((setting, task.key, method.key), []) if r["curve"]]
        if not group:
            continue
        by_step: dict[int, list[float]] = {}
        for run in group:
            for step, _, value in curve(run):
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        color = COLORS.get(method.key)
        seeds = f"{len(group)} seed" + ("s" if len(group) > 1 else "")
        ax.plot(steps, mean, color=color, label=f"{method.label} ({seeds})", linewidth=1.6)
        if len(group) > 1:
            low, high = [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]
            ax.fill_between(steps, low, high, color=color, alpha=0.12, linewidth=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    some = next(r for m in grid.METHODS for r in runs.get((setting, task.key, m), []))
    ax.axhline(majority(some, "dev"), color="black", linestyle=":", linewidth=1, label="majority class (dev)")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel(f"dev {some['metric']} (points)")
    ax.set_title(f"{task.label}, {grid.SETTING_LABELS[setting].lower()}: dev score while training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def spread_png(runs: dict, setting: str, tasks: list[grid.Task], path: Path) -> bool:
    """One panel per task with runs: each seed's test score per method (dots), the mean (a bar across), the
    majority class (dotted line). Returns False when no task has a finished run."""
    shown = [t for t in tasks if any(runs.get((setting, t.key, m)) for m in grid.METHODS)]
    if not shown:
        return False
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    methods = list(grid.METHODS.values())
    for ax, task in zip(axes.flat, shown, strict=False):
        for x, method in enumerate(methods):
            group = runs.get((setting, task.key, method.key), [])
            values = [s for s in (score(r) for r in group) if s is not None]
            color = COLORS.get(method.key)
            if values:
                ax.scatter([x] * len(values), values, color=color, s=16, alpha=0.8, zorder=3)
                ax.scatter([x], [sum(values) / len(values)], color=color, marker="_", s=400, linewidths=2, zorder=4)
        some = next(r for m in grid.METHODS for r in runs.get((setting, task.key, m), []))
        ax.axhline(majority(some), color="black", linestyle=":", linewidth=1)
        ax.set_title(task.label, fontsize=10)
        ax.set_xticks(range(len(methods)), [m.key.replace("_", "\n") for m in methods], fontsize=7)
        ax.set_ylabel(f"test {some['metric']}", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(f"{grid.SETTING_LABELS[setting]}: test score of every seed (dots), mean (dash), majority (dotted)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
