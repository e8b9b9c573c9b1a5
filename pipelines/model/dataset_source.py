"""CDL's data as MLflow dataset sources: a label snapshot, or a data commit.

MLflow records where a run's dataset came from as a source type and a JSON description; its own
types are files, URLs and tables. A label snapshot (`use_case/name`) and a data commit
(`repo@commit`) are neither, so they get a type of their own: `cdl_label_snapshot` or
`cdl_data_commit`, with `{"ref": ...}`. Loading one back goes through CDL (`cdl label snapshot
show`, `cdl data ls`), not MLflow, so `load` says so. Imported only where MLflow is.
"""

from __future__ import annotations

from typing import Any

from mlflow.data.dataset_source import DatasetSource

from pipelines.core.errors import Unsupported

LABEL_SNAPSHOT = "cdl_label_snapshot"
DATA_COMMIT = "cdl_data_commit"


class CDLSource(DatasetSource):
    """A label snapshot or a data commit, by its CDL reference; use the subclasses: MLflow asks
    the class, not the instance, for the source type."""

    def __init__(self, ref: str):
        self.ref = ref

    def load(self) -> Any:
        raise Unsupported(
            f"MLflow cannot load {self._get_source_type()} {self.ref} itself",
            "read it with CDL: cdl label snapshot show / cdl data ls",
        )

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # never guessed from a string: made explicitly

    @classmethod
    def _resolve(cls, raw_source: Any) -> CDLSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> CDLSource:
        return cls(source_dict["ref"])


class LabelSnapshotSource(CDLSource):
    @staticmethod
    def _get_source_type() -> str:
        return LABEL_SNAPSHOT


class DataCommitSource(CDLSource):
    @staticmethod
    def _get_source_type() -> str:
        return DATA_COMMIT
