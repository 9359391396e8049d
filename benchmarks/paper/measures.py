"""What the report measures, from the run JSONs that ``run.py`` writes: scores, convergence, stability.

    runs = load_runs(Path("benchmarks/paper/runs"))
    group = runs[("fewshot", "cluewsc", "fl")]          # the finished runs of one cell, any seeds
    scores(group)                                        # test scores in points (0-100)

- A run's **score** is its test score in points: the task metric (accuracy, entity F1, CMRC exact match) of the
  checkpoint chosen on dev, on examples used neither to train nor to choose.
- **Convergence**: optimisation steps (and training seconds) until the dev score first reaches 95% of the run's own
  best dev score, for runs that learned (test score at least 1 point above the majority class); a run at chance
  "converges" at its first evaluation, so it is left out.
- **Stability**: the standard deviation of the score over seeds, and whether a run fails to beat the majority class
  (the score of always answering the training set's most frequent label; 0 for NER and CMRC). One method's spread
  counts as lower than another's only when a one-sided F-test says so (p < 0.05): with 5 seeds a std is itself
  uncertain by about a third (with 3 by half), so a smaller std alone is no evidence.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from scipy import stats

CONVERGED = 0.95  # a run has converged once its dev score reaches this fraction of its own best
LEARNED_MARGIN = 1.0  # points above the majority class on test for a run to count as having learned
CHANCE_MARGIN = 1.5  # a task where no method's mean is this far above the majority class separates no methods

Key = tuple[str, str, str]  # (setting, task, method)


def load_runs(runs_dir: Path) -> dict[Key, list[dict[str, Any]]]:
    """Every run JSON under ``runs_dir`` (at any depth: ``diagnostics/<name>/`` holds one grid layout per
    investigation), grouped by (setting, task, method), sorted by seed."""
    groups: dict[Key, list[dict[str, Any]]] = {}
    for path in sorted(Path(runs_dir).rglob("seed*.json")):
        run = json.loads(path.read_text(encoding="utf-8"))
        groups.setdefault((run["setting"], run["task"], run["method"]), []).append(run)
    for group in groups.values():
        group.sort(key=lambda r: r["seed"])
    return groups


def points(run: dict[str, Any], value: float) -> float:
    return 100.0 * value if run["percent"] else value


def score(run: dict[str, Any], split: str = "test") -> float | None:
    """The run's score on ``split`` in points; None for a run that diverged or has no such split."""
    if run["status"] != "finished" or not run.get(split):
        return None
    return points(run, run[split][run["metric"]])


def majority(run: dict[str, Any], split: str = "test") -> float:
    return points(run, run["majority"].get(split, 0.0))


def scores(group: list[dict[str, Any]], split: str = "test") -> list[float]:
    return [s for s in (score(r, split) for r in group) if s is not None]


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread_lower(a: list[float], b: list[float], alpha: float = 0.05) -> bool:
    """Whether the scores ``a`` vary less over seeds than ``b`` beyond what seed noise explains: a one-sided F-test
    of var(b) / var(a) (scores roughly normal over seeds). Needs 2+ scores on each side."""
    var_a, var_b = statistics.variance(a), statistics.variance(b)
    if var_b == 0:
        return False
    ratio = var_b / var_a if var_a > 0 else math.inf
    return bool(stats.f.sf(ratio, len(b) - 1, len(a) - 1) < alpha)


def separates(groups: list[list[dict[str, Any]]]) -> bool:
    """Whether some method's mean test score on this task is more than ``CHANCE_MARGIN`` points above the majority
    class: a task where every method is at chance cannot rank them."""
    means = [statistics.fmean(s) for s in (scores(g) for g in groups) if s]
    runs = [r for g in groups for r in g]
    return bool(means) and max(means) - majority(runs[0]) > CHANCE_MARGIN


def fails(run: dict[str, Any]) -> bool:
    """A diverged run, or one whose test score does not beat the majority class."""
    s = score(run)
    return s is None or s <= majority(run) + 1e-9


def curve(run: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(step, training seconds, dev score in points) per evaluation."""
    return [(p["step"], p["seconds"], points(run, p[run["metric"]])) for p in run["curve"] if run["metric"] in p]


def learned(run: dict[str, Any]) -> bool:
    """The run beat the majority class by at least ``LEARNED_MARGIN`` points on test: it has learned something
    that generalises, so how fast it got there means something."""
    s = score(run)
    return s is not None and s > majority(run) + LEARNED_MARGIN


def time_to_converge(run: dict[str, Any]) -> tuple[int, float] | None:
    """(steps, seconds) until the dev score first reached 95% of the run's best; None for a run that did not learn
    (``learned``; a run at chance "converges" at its first evaluation) or has no curve."""
    points_ = curve(run)
    if not points_ or not learned(run):
        return None
    best = max(s for _, _, s in points_)
    if best <= majority(run, "dev") + 1e-9 or best <= 0:
        return None
    return next((step, seconds) for step, seconds, s in points_ if s >= CONVERGED * best)


def seed_pairs(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(a's run, b's run) for each seed both have run, in a's order: a seed is the same data split for every method."""
    by_seed = {r["seed"]: r for r in b}
    return [(r, by_seed[r["seed"]]) for r in a if r["seed"] in by_seed]


def same_machine(a: dict, b: dict) -> bool:
    """Whether two runs' seconds compare: the same device, and the same hardware and threads where both record it."""
    recorded = a.get("hardware") and b.get("hardware")
    return a["device"] == b["device"] and (not recorded or a["hardware"] == b["hardware"])


def convergence_ratio(fl: list[dict], other: list[dict]) -> dict[str, Any] | None:
    """How much sooner FL-tuning converges than ``other``, over the seeds both have (and both converged on):
    mean steps of each, their ratio (other / FL: above 1 means FL is faster), and the same in seconds for the seeds
    that ran on the same kind of device and, where recorded, the same hardware and thread count (seconds on a GPU and
    on a CPU do not compare, nor on one CPU thread and two)."""
    pairs = seed_pairs(fl, other)
    timed = [(time_to_converge(a), time_to_converge(b), same_machine(a, b)) for a, b in pairs]
    timed = [(a, b, same) for a, b, same in timed if a is not None and b is not None]
    if not timed:
        return None
    fl_steps = statistics.fmean(a[0] for a, _, _ in timed)
    other_steps = statistics.fmean(b[0] for _, b, _ in timed)
    comparable = [(a[1], b[1]) for a, b, same in timed if same]
    seconds = None
    if comparable:
        fl_s, other_s = statistics.fmean(a for a, _ in comparable), statistics.fmean(b for _, b in comparable)
        seconds = (fl_s, other_s, other_s / fl_s if fl_s > 0 else math.nan)
    return {
        "pairs": len(timed),
        "fl_steps": fl_steps,
        "other_steps": other_steps,
        "ratio": other_steps / fl_steps if fl_steps > 0 else math.nan,
        "seconds": seconds,
    }


def paired_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[float, float, int] | None:
    """The mean of (a's test score - b's) over the seeds both have run, its standard error over those seeds (nan for
    one seed) and their number; None when no seed has a score on both sides. A seed is the same data split for every
    method, and few-shot splits differ in difficulty, so the gap is taken seed by seed, never between means over
    different seeds."""
    both = [(score(x), score(y)) for x, y in seed_pairs(a, b)]
    diffs = [x - y for x, y in both if x is not None and y is not None]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), se, len(diffs)


def geometric_mean(values: list[float]) -> float | None:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None
