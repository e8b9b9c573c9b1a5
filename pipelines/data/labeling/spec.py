"""A use case's labeling spec: `use_cases/<name>/labeling.yaml` names the Label Studio project,
its labeling configuration, which validated files become tasks, which <Choices> holds the label
and how labels are split into train and test."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.core.errors import Invalid, NotFound

USE_CASES = Path(__file__).resolve().parents[3] / "use_cases"
# What `cdl label snapshot NAME` accepts; experiment specs name snapshots the same way.
SNAPSHOT_NAME = re.compile(r"[a-zA-Z0-9_.-]{1,63}")


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repo: str
    path: str = "/"


class LabelingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str
    label_config: str
    source: SourceSpec
    task: str = Field(pattern="^(text|image)$")
    choices: str
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0


@dataclass
class UseCase:
    name: str
    folder: Path
    spec: LabelingSpec

    @property
    def label_config(self) -> str:
        return (self.folder / self.spec.label_config).read_text(encoding="utf-8")

    @property
    def labels(self) -> list[str]:
        """The choice values of the labeling configuration's <Choices>."""
        root = ET.fromstring(self.label_config)
        for choices in root.iter("Choices"):
            if choices.get("name") == self.spec.choices:
                return [c.get("value") for c in choices.iter("Choice")]
        raise Invalid(
            f'{self.folder / self.spec.label_config} has no <Choices name="{self.spec.choices}">',
            "fix 'choices' in labeling.yaml",
        )

    @property
    def labels_repo(self) -> str:
        return f"{self.name.replace('_', '-')}-labels"


def use_case(name: str, root: Path = USE_CASES) -> UseCase:
    folder = root / name
    spec_file = folder / "labeling.yaml"
    if not spec_file.is_file():
        known = sorted(p.parent.name for p in root.glob("*/labeling.yaml"))
        raise NotFound(
            f"no use case '{name}' with a labeling.yaml", f"use one of: {', '.join(known)}"
        )
    try:
        spec = LabelingSpec.model_validate(yaml.safe_load(spec_file.read_text()))
    except (ValidationError, yaml.YAMLError) as exc:
        raise Invalid(f"{spec_file}: {exc}", "fix the file") from exc
    return UseCase(name, folder, spec)


def use_cases_by_project(root: Path = USE_CASES) -> dict[str, str]:
    """Use case names by their Label Studio project title."""
    return {
        use_case(p.parent.name, root).spec.project: p.parent.name
        for p in root.glob("*/labeling.yaml")
    }
