"""Uploaded datasets: checked when they arrive, then kept in the database, so that a
worker on any node reads the same bytes (`{source: uploaded, id: N}` in a spec)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import PurePath

from hpsearch.data.tables import DatasetFormat, Upload, frame_facts, read_table
from hpsearch.errors import DatasetError, NotFound
from hpsearch.service.views import DatasetView
from hpsearch.storage import records
from hpsearch.storage.store import Store

FORMATS: dict[str, DatasetFormat] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".npz": "npz",
}


class DatasetNotFound(NotFound):
    """No uploaded dataset with that id."""


@dataclass(frozen=True)
class StoredUploads:
    """The uploads kept in one database, read by id: what data loading is given, so that it
    reads uploads without touching the database itself. Equal for the same URL, so a
    worker's cache of loaded data keeps one entry per database."""

    store: Store

    def __call__(self, dataset_id: int) -> Upload:
        with self.store.session() as session:
            record = records.dataset(session, dataset_id)
            if record is None:
                raise DatasetError(f"no uploaded dataset with id {dataset_id} in this database")
            return Upload(
                record.id, record.name, record.content, record.format, record.target, record.task
            )


def parse_target(target: str) -> str | list[str]:
    """`label` is one target column; `a,b,c` are the columns of a multilabel target."""
    names = [name.strip() for name in target.split(",") if name.strip()]
    if not names:
        raise DatasetError("give the name of the label column", field="target")
    return names if len(names) > 1 else names[0]


def add_dataset(
    store: Store, filename: str, content: bytes, target: str | list[str], max_cells: int
) -> DatasetView:
    """Check the upload as a worker would read it (format, target column, finite values,
    encodable features, at most `max_cells` values) and store it; a refused upload stores
    nothing."""
    fmt = FORMATS.get(PurePath(filename).suffix.lower())
    if fmt is None:
        raise DatasetError(
            f"cannot tell the format of {filename!r}; name it .csv, .parquet or .npz"
        )
    frame = read_table(io.BytesIO(content), fmt, target, filename, max_cells)
    task = frame_facts(frame, target, None, filename).task
    with store.session() as session:
        record = records.add_dataset(
            session,
            name=PurePath(filename).name,
            format=fmt,
            target=target,
            task=task,
            content=content,
            sha256=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content),
            n_rows=len(frame),
            columns=[str(c) for c in frame.columns],
        )
        return DatasetView.model_validate(record)


def list_datasets(store: Store) -> list[DatasetView]:
    with store.session() as session:
        return [DatasetView.model_validate(r) for r in records.all_datasets(session)]


def get_dataset(store: Store, dataset_id: int) -> DatasetView:
    with store.session() as session:
        record = records.dataset_without_content(session, dataset_id)
        if record is None:
            raise DatasetNotFound(f"no uploaded dataset with id {dataset_id}")
        return DatasetView.model_validate(record)
