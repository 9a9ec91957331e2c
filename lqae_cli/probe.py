"""`lqae probe`: linear probe on frozen LQAE features, next to pixel and random-encoder baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lqae.errors import ConfigError
from lqae.probe.config import BASELINES, ProbeConfig
from lqae_cli.common import check_line_paths, handle_errors
from lqae_cli.options import (
    AllowForeignOption, BatchSizeOption, DeviceOption, JsonOption, ModelOption, QuietOption, choice_enum, load_run,
)
from lqae_cli.progress import Bars, wanted

Baseline = choice_enum("Baseline", ("all", *BASELINES, "none"))


def _baseline_names(choice: Baseline) -> tuple[str, ...]:
    """The library's baseline names for a --baseline choice (all / none / one of BASELINES)."""
    return {"all": BASELINES, "none": ()}.get(choice.value, (choice.value,))


@handle_errors
def probe(
    inputs: Annotated[Optional[List[Path]], typer.Argument(
        help="TRAIN: image folder (one sub-folder per class) or token dataset from `lqae encode --out`; "
        "with --apply: images or folders to classify.", show_default=False, metavar="TRAIN | IMAGES",
    )] = None,
    val: Annotated[Optional[Path], typer.Option(
        "--val", help="Held-out split, same classes as TRAIN (folder or token dataset).",
    )] = None,
    model: ModelOption = None,
    layers: Annotated[str, typer.Option(
        help="lm (every LM hidden state), encoder, all, or a list like lm:0,lm:-1,enc:2 (negative = from the end).",
    )] = "lm",
    epochs: Annotated[int, typer.Option(min=1, help="Head training epochs over the cached features.")] = 100,
    baseline: Annotated[Baseline, typer.Option(
        help="Baselines trained with the same head: pixels, random-encoder, all or none.",
    )] = Baseline.all,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate of the head (warm-up, then cosine).")] = 3e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay of the head's linear weight.")] = 1e-4,
    head_batch_size: Annotated[int, typer.Option(min=1, help="Head minibatch size.")] = 256,
    batch_size: BatchSizeOption = 64,
    seed: Annotated[int, typer.Option(help="Seed for the head and the random encoder.")] = 0,
    save: Annotated[Optional[Path], typer.Option(
        "--save", help="Write the trained head to this folder (probe.safetensors + probe.json).",
    )] = None,
    apply: Annotated[Optional[Path], typer.Option(
        "--apply", help="Classify the given images with a probe folder written by --save.",
    )] = None,
    lm: Annotated[Optional[str], typer.Option(
        help="Load the frozen LM from here instead of the checkpoint's LM name.",
    )] = None,
    allow_foreign: AllowForeignOption = False,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Linear probe: train LayerNorm + Linear on frozen LM features of TRAIN, report top-1 on --val.

    Example: lqae probe data/digits/train --val data/digits/val --model runs/digits --save runs/digits/probe
    Apply a saved probe: lqae probe --apply runs/digits/probe --model runs/digits img1.png img2.png
    """
    if apply is not None:
        if not inputs:
            raise ConfigError("--apply needs images or folders to classify: lqae probe --apply DIR IMG...")
        _apply(apply, inputs, model, lm, device, batch_size, as_json, quiet)
        return
    if not inputs or len(inputs) != 1:
        raise ConfigError("give exactly one TRAIN folder or token dataset: lqae probe TRAIN --val VAL --model RUN")
    if val is None:
        raise ConfigError("--val is required: the probe is scored on a held-out split with the same classes")
    if model is None:
        raise ConfigError("--model is required (or set LQAE_MODEL): the checkpoint folder written by `lqae train`")

    from lqae.probe.run import run_probe
    from lqae.probe.saved import save_probe

    config = ProbeConfig(
        layers=layers, baselines=_baseline_names(baseline), epochs=epochs, batch_size=head_batch_size, lr=lr,
        weight_decay=weight_decay, feature_batch_size=batch_size, seed=seed,
    )
    loaded = load_run(model, device, lm=lm)
    with Bars(wanted(quiet)) as bars:
        report, head = run_probe(
            loaded, inputs[0], val, config, progress=bars, model_dir=model, allow_foreign_tokens=allow_foreign,
        )
    if save is not None:
        save_probe(save, head, report, loaded)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _render(report, save)


def _apply(folder, images, model, lm, device, batch_size, as_json, quiet) -> None:
    from lqae.probe.saved import apply_probe, load_probe

    loaded_probe = load_probe(folder)
    model = model or (Path(loaded_probe.model) if loaded_probe.model else None)
    if model is None:
        raise ConfigError("--model is required with --apply (the checkpoint the probe was trained on)")
    loaded = load_run(model, device, lm=lm)
    with Bars(wanted(quiet)) as bars:
        predictions = apply_probe(loaded, loaded_probe, images, batch_size, bars)
    if as_json:
        typer.echo(json.dumps([{"path": p.path, "class": p.label, "score": p.score} for p in predictions], indent=2))
    elif len(predictions) == 1:
        typer.echo(predictions[0].label)
    else:
        check_line_paths([p.path for p in predictions], "use --json, which quotes every path, or rename the file")
        for p in predictions:
            typer.echo(f"{p.path}\t{p.label}")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _render(report, saved: Optional[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    if not out.is_terminal:  # piped or captured: do not squeeze the tables into 80 columns
        out = Console(width=120)
    rows = [("probe", report.probe)] + list(report.baselines.items())
    summary = Table(title=f"linear probe, layers {_layer_summary(report.layers)}", title_justify="left")
    for column in ("features", "dim", "train top-1 %", "val top-1 %", "val top-5 %", "extract s", "head s"):
        summary.add_column(column, justify="left" if column == "features" else "right")
    for name, scores in rows:
        summary.add_row(
            name, str(scores.feature_dim), _percent(scores.train_top1), _percent(scores.top1), _percent(scores.top5),
            f"{scores.feature_seconds:.1f}", f"{scores.head_seconds:.1f}",
        )
    out.print(summary)
    per_class = Table(title="per-class val top-1 %", title_justify="left")
    per_class.add_column("class")
    per_class.add_column("train n", justify="right")
    per_class.add_column("val n", justify="right")
    for name, _ in rows:
        per_class.add_column(name, justify="right")
    for cls in report.classes:
        per_class.add_row(
            cls, str(report.class_counts["train"][cls]), str(report.class_counts["val"][cls]),
            *(_percent(scores.per_class[cls]) for _, scores in rows),
        )
    out.print(per_class)
    out.print(
        f"{report.train_size} train / {report.val_size} val images ({report.inputs['train']} / {report.inputs['val']}), "
        f"{len(report.classes)} classes, majority-class top-1 {_percent(report.majority_top1)}%; features "
        f"{report.probe.feature_seconds:.1f} s ({report.feature_seconds_per_1000:.1f} s per 1000 images)",
        soft_wrap=True,
    )
    if saved is not None:
        out.print(f"probe saved to {saved}")


def _layer_summary(layers: list[str]) -> str:
    return ",".join(layers) if len(layers) <= 8 else f"{','.join(layers[:3])},... ({len(layers)} states)"
