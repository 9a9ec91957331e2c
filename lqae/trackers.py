"""Experiment trackers for `lqae train --tracker`: TensorBoard or Weights & Biases, as training callbacks.

Each logs every metric of metrics.jsonl as a scalar at its step (training lines and `val_*` lines),
each sample grid as an image, and the model and training config as hyper-parameters. Both are
optional dependencies: a missing package is a ConfigError naming the install command, raised when
the tracker is made, before any training. Files go under the run folder (`tensorboard/`, `wandb/`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from lqae.errors import ConfigError
from lqae.callbacks import TrainCallback, TrainInfo

TRACKERS = ("none", "tensorboard", "wandb")


def make_tracker(name: str, run_dir: str | Path, config: dict) -> "Tracker | None":
    """The tracker called `name` for a run folder, or None for "none"; `config` is logged as hyper-parameters."""
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
    if name == "none":
        return None
    if name not in kinds:
        raise ConfigError(f"unknown tracker {name!r}; choose one of: {', '.join(TRACKERS)}")
    return kinds[name](Path(run_dir), config)


def flat_config(config: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """{"model": {"image_size": 32}} -> {"model.image_size": 32}; None and lists become strings."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class Tracker(TrainCallback):
    """Shared logic: scalars once per metrics line, validation lines, sample grids; `close` at the end."""

    name = ""  # the --tracker value, also the pip extra
    package = ""  # the module it needs

    def __init__(self, run_dir: Path, config: dict) -> None:
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(
                f"--tracker {self.name} needs the {self.package} package: pip install 'lqae[{self.name}]'"
            )
        self.run_dir, self.config = run_dir, config
        self._logged_step: int | None = None

    def on_start(self, info: TrainInfo) -> None:  # rank 0 only: open the writer here, not in __init__
        self.open()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if metrics.get("step") == step and self._logged_step != step:  # a new metrics.jsonl line
            self._logged_step = step
            self.scalars(step, metrics)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        self.scalars(step, metrics)

    def on_samples(self, step: int, path: Path) -> None:
        self.image(step, path)

    @staticmethod
    def numbers(metrics: dict) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}

    def open(self) -> None: ...
    def scalars(self, step: int, metrics: dict) -> None: ...
    def image(self, step: int, path: Path) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    """Event files under RUN_DIR/tensorboard: `tensorboard --logdir RUN_DIR/tensorboard`."""

    name = package = "tensorboard"

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self.writer.add_text("config", "```json\n" + json.dumps(self.config, indent=2, sort_keys=True) + "\n```", 0)
        self.writer.add_hparams(flat_config(self.config), {}, run_name=".")

    def scalars(self, step: int, metrics: dict) -> None:
        for key, value in self.numbers(metrics).items():
            self.writer.add_scalar(key, value, step)

    def image(self, step: int, path: Path) -> None:
        import numpy as np  # noqa: PLC0415 - lqae_cli imports this module for `--help` (TRACKERS)
        from PIL import Image  # noqa: PLC0415 - as numpy

        with Image.open(path) as picture:
            self.writer.add_image("samples", np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.flush()
            writer.close()


class WandbTracker(Tracker):
    """A W&B run in project $WANDB_PROJECT (default "lqae"), named after the run folder; files under
    RUN_DIR/wandb. `WANDB_MODE=offline` writes without an account (`wandb sync` uploads later)."""

    name = package = "wandb"

    def open(self) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lqae"), name=self.run_dir.name, dir=str(self.run_dir),
            config=self.config, reinit="finish_previous",
        )

    def scalars(self, step: int, metrics: dict) -> None:
        self.run.log(self.numbers(metrics), step=step)

    def image(self, step: int, path: Path) -> None:
        self.run.log({"samples": self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        run = getattr(self, "run", None)
        if run is not None:
            run.finish()
