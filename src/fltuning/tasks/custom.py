"""Bring your own data: a classification or sentence-pair task over any file or Hugging Face dataset, no code.

Name the fields and point ``read`` at the data::

    task = CustomClassificationTask(text_field="review", label_field="stars")           # one text
    task = CustomClassificationTask(text_field="q1", text_pair_field="q2")               # a pair
    train = task.read("train.jsonl")      # JSON Lines; also .csv and .tsv (header row = field names)
    train = task.read("saved_dataset/train")   # a folder written by datasets' save_to_disk (one split)

    task = CustomClassificationTask(dataset="csv", dataset_kwargs={"data_files": {"train": "a.csv"}})
    train = task.read("train")            # with ``dataset`` set, read() takes a split: load_dataset(dataset, split=)

Everything else is the classification task's (``fltuning.tasks.classification``): [CLS] text [SEP] (pairs:
[CLS] a [SEP] b [SEP], longer side truncated first), pooled vector -> Linear, cross-entropy, accuracy. The labels are
given (``labels=[...]``), else a dataset's ``ClassLabel`` names, else the sorted labels of the first file read (read
the training file first). Local files and ``save_to_disk`` folders never touch the network; a Hub dataset name needs
the network or the datasets cache (``HF_DATASETS_OFFLINE=1``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fltuning.tasks.base import DataError, iter_json_lines
from fltuning.tasks.classification import ClassificationTask

JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")
DELIMITERS = {".csv": ",", ".tsv": "\t"}


class CustomClassificationTask(ClassificationTask):
    """Classification of ``text_field`` (and ``text_pair_field``) into ``label_field`` values.

    ``dataset`` / ``dataset_config`` / ``dataset_kwargs``: read splits with ``datasets.load_dataset`` instead of
    files. ``id_field``: where the submission id comes from (default ``id``; else the row's position)."""

    def __init__(
        self,
        text_field: str = "text",
        label_field: str = "label",
        text_pair_field: str | None = None,
        labels: Sequence[str] | None = None,
        id_field: str = "id",
        dataset: str | None = None,
        dataset_config: str | None = None,
        dataset_kwargs: dict[str, Any] | None = None,
        name: str = "custom",
    ):
        super().__init__(
            name=name,
            text_field=text_field,
            text_pair_field=text_pair_field,
            label_field=label_field,
            labels=labels,
            id_fields=(id_field,),
        )
        self.dataset, self.dataset_config = dataset, dataset_config
        self.dataset_kwargs = dict(dataset_kwargs or {})

    def source_name(self, path: str | Path) -> str:
        if self.dataset is not None:
            config = f"/{self.dataset_config}" if self.dataset_config else ""
            return f"{self.dataset}{config}[{path}] row"
        return f"{path} row" if Path(path).is_dir() else str(path)

    def records(self, path: str | Path) -> Iterable[tuple[int | None, dict[str, Any]]]:
        if self.dataset is not None:
            return self._dataset_rows(self._load_dataset(str(path)), self.source_name(path))
        path = Path(path)
        if path.is_dir():
            return self._dataset_rows(self._load_from_disk(path), self.source_name(path))
        if not path.is_file():
            raise DataError(path, None, "file not found")
        suffix = path.suffix.lower()
        if suffix in DELIMITERS:
            return _csv_rows(path, DELIMITERS[suffix])
        if suffix in JSON_LINES_SUFFIXES:
            with path.open(encoding="utf-8-sig") as handle:
                first = handle.read(4096).lstrip()[:1]
            if first == "[":
                raise DataError(path, 1, "this is one JSON array; write one JSON object per line (JSON Lines)")
            return iter_json_lines(path)
        raise DataError(path, None, f"unsupported file type {suffix!r}: use JSON Lines (.jsonl/.json), .csv or .tsv")

    def _load_dataset(self, split: str):
        import datasets

        try:
            return datasets.load_dataset(self.dataset, self.dataset_config, split=split, **self.dataset_kwargs)
        except Exception as err:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
            raise DataError(self.source_name(split), None, f"cannot load the dataset split: {err}") from err

    def _load_from_disk(self, path: Path):
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(path, None, f"not a folder written by datasets' save_to_disk ({err})") from err
        if isinstance(data, datasets.DatasetDict):
            raise DataError(
                path, None, f"holds several splits {sorted(data)}: pass the split folder, e.g. {path}/train"
            )
        return data

    def _dataset_rows(self, data, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """Rows of a ``datasets.Dataset`` as records (1-based row numbers); ``ClassLabel`` ids become their names
        (and the task's labels, unless given), and the id -1 (no label) becomes unlabelled."""
        import datasets

        missing = [f for f in (self.text_field, self.text_pair_field) if f and f not in data.column_names]
        if missing:
            raise DataError(source, None, f"missing column(s) {missing} (columns: {data.column_names})")
        feature = data.features.get(self.label_field)
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        if names is not None and self.labels is None:
            self.labels = list(names)
        return self._rows(data, names)

    def _rows(self, data, names: list[str] | None) -> Iterator[tuple[int, dict[str, Any]]]:
        for row, record in enumerate(data, start=1):
            if names is not None and record.get(self.label_field) is not None:
                value = record[self.label_field]
                record[self.label_field] = names[value] if 0 <= value < len(names) else None
            yield row, record


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Records of a CSV / TSV file with a header row; an empty cell is a missing value (line numbers 1-based)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(path, 1, "no header row (the first line must name the columns)")
        start = 2
        try:
            for row in reader:
                if None in row:
                    raise DataError(path, start, f"more cells than the {len(reader.fieldnames)} header columns")
                yield start, {key: (value if value != "" else None) for key, value in row.items()}
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(
                path, reader.line_num, f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({err})"
            ) from err
