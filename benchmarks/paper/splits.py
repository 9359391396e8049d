"""Disjoint random parts of a data file, drawn once and written next to the benchmark's runs.

    files = carve_files(carve, data_dir, dest, seed)   # {"train": dest/train.jsonl, "dev": dest/dev.jsonl}

The draw is a permutation of the file's units (JSON Lines: lines; SQuAD JSON: questions) by ``random.Random(seed)``;
the parts take consecutive slices of it, so they never overlap, and each part keeps the file's order. The same
(file, sizes, seed) always gives the same parts. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from grid import Carve


def draw(n: int, sizes: dict[str, int | None], seed: int) -> dict[str, list[int]]:
    """Disjoint sorted index lists of the given sizes (None: all that is left). Raises ``ValueError`` when the
    sizes add up to more than ``n``."""
    fixed = sum(size for size in sizes.values() if size is not None)
    if fixed > n:
        raise ValueError(f"cannot draw {fixed} units from a file of {n}")
    order = random.Random(seed).sample(range(n), n)
    parts, start = {}, 0
    for part, size in sizes.items():
        stop = n if size is None else start + size
        parts[part] = sorted(order[start:stop])
        start = stop
    return parts


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _squad_questions(document: dict) -> list[tuple[int, int, dict]]:
    """(article index, paragraph index, question) for every question, in file order."""
    return [
        (a, p, qa)
        for a, article in enumerate(document["data"])
        for p, paragraph in enumerate(article["paragraphs"])
        for qa in paragraph["qas"]
    ]


def _squad_subset(document: dict, questions: list[tuple[int, int, dict]], keep: list[int]) -> dict:
    """The document with only the questions at ``keep`` (paragraphs and articles left empty are dropped)."""
    chosen: dict[tuple[int, int], list[dict]] = {}
    for i in keep:
        a, p, qa = questions[i]
        chosen.setdefault((a, p), []).append(qa)
    data = []
    for a, article in enumerate(document["data"]):
        paragraphs = [
            dict(paragraph, qas=chosen[(a, p)])
            for p, paragraph in enumerate(article["paragraphs"])
            if (a, p) in chosen
        ]
        if paragraphs:
            data.append(dict(article, paragraphs=paragraphs))
    return dict(document, data=data)


def carve_files(carve: Carve, data_dir: Path, dest: Path, seed: int) -> dict[str, Path]:
    """Write the parts of ``carve.source`` drawn with ``seed`` (or 0 when the carve is shared by all seeds) under
    ``dest``; returns part -> file. Existing files are reused (the draw is deterministic)."""
    seed = seed if carve.per_seed else 0
    source = Path(data_dir) / carve.source
    suffix = ".json" if carve.squad else ".jsonl"
    stem = source.name.split(".")[0]
    paths = {part: dest / f"{stem}.{part}.seed{seed}{suffix}" for part in carve.parts}
    if all(p.is_file() for p in paths.values()):
        return paths
    if carve.squad:
        document = json.loads(source.read_text(encoding="utf-8-sig"))
        questions = _squad_questions(document)
        for part, keep in draw(len(questions), carve.parts, seed).items():
            subset = _squad_subset(document, questions, keep)
            _write(paths[part], json.dumps(subset, ensure_ascii=False) + "\n")
    else:
        lines = [line for line in source.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        for part, keep in draw(len(lines), carve.parts, seed).items():
            _write(paths[part], "".join(lines[i] + "\n" for i in keep))
    return paths
