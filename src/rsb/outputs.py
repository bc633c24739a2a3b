"""Where one training's files live: the main grid at the project root, a study's runs under studies/<study>/.

    Outputs.of("resnet50", "a1")                        models/resnet50-a1.safetensors, metrics/train/..., runs/...
    Outputs.of("resnet50", "a2", study="seeds", seed=7)  studies/seeds/models/resnet50-a2-seed7.safetensors, ...
    Outputs.finetune("resnet50", "a1", "pets")          studies/transfer/models/resnet50-a1-to-pets.safetensors, ...

A study's files never land in the grid's folders, so the figure-4 report (which depends on metrics/train and
metrics/eval as folders) does not rerun when a seed is added. Checkpoints stay under checkpoints/<name>/ (the name is
unique) so resuming works the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GRID = "grid"  # the `rsb.study` tag of the main (models x run) trainings
TRANSFER = "transfer"  # the transfer study's fine-tunes
STARTS = Path("studies/transfer/starts")  # the transfer study's checked starts (<name>.safetensors + .json)
STUDY_RUNS = ("seeds", "procedures")  # the studies that train with stages.train (--study): a name, never a path
EMA_STUDY = "procedures"  # the one study whose stages declare a model EMA's weights (T2: DeiT's --model-ema)


@dataclass(frozen=True)
class Outputs:
    name: str
    root: Path = Path(".")
    study: str = GRID
    seed: int | None = None
    matrix_key: str | None = None  # the fine-tune's finetune@<start>-<dataset>

    @classmethod
    def of(
        cls, arch: str, recipe: str, study: str | None = None, seed: int | None = None, root: Path = Path(".")
    ) -> Outputs:
        name = f"{arch}-{recipe}" + (f"-seed{seed}" if seed is not None else "")
        if study and study != GRID:
            return cls(name, root / "studies" / study, study, seed)
        return cls(name, root, GRID, seed)

    @classmethod
    def finetune(cls, arch: str, start: str, dataset: str, root: Path = Path(".")) -> Outputs:
        """The transfer study's fine-tune of `arch` from `start` on `dataset`: studies/transfer/..."""
        return cls(f"{arch}-{start}-to-{dataset}", root / "studies" / TRANSFER, TRANSFER, None, f"{start}-{dataset}")

    @property
    def weights(self) -> Path:
        return self.root / "models" / f"{self.name}.safetensors"

    @property
    def ema_dir(self) -> Path:
        """The model EMA's folder (procedures study): ema.json always, model_ema.safetensors when the recipe keeps
        one (DVC declares the folder: the same outputs for every recipe)."""
        return self.root / "ema" / self.name

    @property
    def ema_weights(self) -> Path:
        return self.ema_dir / "model_ema.safetensors"

    @property
    def train_metrics(self) -> Path:
        return self.root / "metrics" / "train" / f"{self.name}.json"

    @property
    def eval_metrics(self) -> Path:
        return self.root / "metrics" / "eval" / f"{self.name}.json"

    @property
    def run_file(self) -> Path:
        return self.root / "runs" / f"{self.name}.json"

    @property
    def history(self) -> Path:
        return self.root / "plots" / "train" / f"{self.name}.csv"

    @property
    def updates(self) -> Path:
        return self.root / "plots" / "train" / f"{self.name}.updates.csv"

    def training_outputs(self, checkpoints: Path = Path("checkpoints")) -> dict[str, Path]:
        """What the training writes, named for an overlap message (rsb.io.refuse_overlap)."""
        return {
            "weights": self.weights,
            "train metrics": self.train_metrics,
            "run record": self.run_file,
            "history": self.history,
            "checkpoints": checkpoints / self.name,
            **({"model EMA": self.ema_dir} if self.study == EMA_STUDY else {}),
        }

    @property
    def stage(self) -> str:
        """The DVC stage that trains it."""
        if self.in_grid:
            return f"train@{self.name}"
        if self.seed is not None:
            return f"studies/dvc.yaml:seed-train@{self.seed}"
        if self.study == TRANSFER:
            return f"studies/dvc.yaml:finetune@{self.matrix_key}"
        return f"studies/dvc.yaml:{self.study}-train@{self.name}"

    @property
    def in_grid(self) -> bool:
        return self.study == GRID
