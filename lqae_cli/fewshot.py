"""`lqae fewshot`: label images with a text-only LLM shown labelled support images as token text,
or evaluate it on N-way K-shot episodes (Frozen protocol)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from lqae_cli.common import ALLOW_FOREIGN_HELP, MODEL_OPTION_HELP, check_line_paths, handle_errors

DEFAULT_LLM = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"  # = lqae.fewshot.backends.DEFAULT_LLM (kept light for --help)


class Scoring(str, Enum):
    loglik = "loglik"
    generate = "generate"
    constrained = "constrained"


class Order(str, Enum):
    random = "random"
    similar_last = "similar-last"


class ImageText(str, Enum):
    sequence = "sequence"
    frequent = "frequent"


class LabelMode(str, Enum):
    real = "real"
    open = "open"
    letters = "letters"


@handle_errors
def fewshot(
    queries: Optional[List[Path]] = typer.Argument(
        None, help="Images to label (files, folders, or token datasets); leave out with --query."
    ),
    support: Path = typer.Option(
        ..., "--support", "-s", help="Support set: image folder with one sub-folder per class, or a token dataset."
    ),
    query: Optional[Path] = typer.Option(
        None, "--query", "-q", help="Evaluate on episodes drawn from this folder (class sub-folders) or token dataset."
    ),
    model: Optional[Path] = typer.Option(None, "--model", "-m", envvar="LQAE_MODEL", help=MODEL_OPTION_HELP),
    llm: str = typer.Option(DEFAULT_LLM, help="hf:NAME_OR_PATH (folder or .gguf), openai:MODEL, or overlap (no LLM)."),
    api_base: Optional[str] = typer.Option(
        None, help="OpenAI-compatible base URL ending in /v1 (default: $OPENAI_BASE_URL or api.openai.com)."
    ),
    template: str = typer.Option("completion", help="Prompt template: a shipped name (completion, chat) or a file."),
    scoring: Scoring = typer.Option(
        Scoring.loglik, help="loglik: most likely label wins; generate: reply must start with a label; "
        "constrained: greedy decoding among the label tokens only (local models).",
    ),
    calibrate: Optional[bool] = typer.Option(
        None, "--calibrate/--no-calibrate",
        help="Divide out the label prior measured after content-free queries (default: on for loglik with an LLM).",
    ),
    order: Order = typer.Option(
        Order.similar_last, help="Support order: similar-last (most token overlap with the query last) or random "
        "(as drawn; lets a local model reuse one prompt prefix for every query it labels).",
    ),
    image_text: ImageText = typer.Option(
        ImageText.sequence, help="Token text per image: sequence (patch order) or frequent (distinct tokens, most "
        "frequent first; shorter).",
    ),
    ways: Optional[int] = typer.Option(None, help="Classes per episode (evaluation; default 2)."),
    shots: Optional[int] = typer.Option(
        None, help="Support images per class (evaluation default 1; labelling default: up to 5)."
    ),
    episodes: Optional[int] = typer.Option(None, help="Episodes to evaluate (default 200)."),
    seed: int = typer.Option(0, help="Seed for episodes, support choice and open labels."),
    repeats: int = typer.Option(0, min=0, help="Extra copies of the support block (Frozen protocol: 0, 1, 3, 5)."),
    induction: bool = typer.Option(True, "--induction/--no-induction", help="Instruction line naming the labels."),
    labels: LabelMode = typer.Option(
        LabelMode.real, help="real: class folder names; open: nonsense words; letters: A, B, C (one token each).",
    ),
    length_norm: bool = typer.Option(False, "--length-norm", help="loglik per label token instead of summed."),
    context_tokens: Optional[int] = typer.Option(
        None, help="Context budget in LLM tokens (default: the local model's window, 4096 for API models)."
    ),
    min_image_tokens: Optional[int] = typer.Option(
        None, help="Shortest token text per image before shots are dropped (default: half)."
    ),
    max_new_tokens: Optional[int] = typer.Option(None, help="Generation length (default: longest label + 4)."),
    bpe_file: Optional[Path] = typer.Option(None, help="tiktoken .tiktoken file for counting API-model tokens offline."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON lines per query/episode; a rerun resumes."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (for the LQAE and local LLMs)."),
    timeout: float = typer.Option(60.0, help="Seconds per HTTP request (openai backend)."),
    retries: int = typer.Option(4, min=0, help="Retries with back-off on 429/5xx/unreachable (openai backend)."),
    prefix_cache: bool = typer.Option(
        True, "--prefix-cache/--no-prefix-cache", help="Reuse the shared prompt prefix's key/values (local models)."
    ),
    allow_foreign: bool = typer.Option(False, "--allow-foreign-tokens", help=ALLOW_FOREIGN_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
) -> None:
    """Label images with an LLM shown labelled support images as token text, or evaluate it on episodes.

    Example: lqae fewshot --support data/digits/train data/digits/val/seven/0044.png --model runs/digits
    Evaluate: lqae fewshot --support train/ --query val/ --model runs/digits --ways 5 --shots 1 --episodes 200 --seed 0
    One query prints just its label; several print `path<TAB>label` lines. Templates: see prompts/README.md.
    """
    from lqae.errors import ConfigError

    evaluating = query is not None
    if not evaluating:
        given = [name for name, value in (("--ways", ways), ("--episodes", episodes)) if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} apply to evaluation with --query DIR; labelling uses every class")
        if not queries:
            raise ConfigError("nothing to do: give query images to label, or --query DIR to evaluate on episodes")

    from lqae.fewshot.evaluate import EvalSummary, FewshotSettings
    from lqae.fewshot.run import FewshotJob, Progress, run_fewshot
    from lqae_cli.common import resolve_device

    settings = FewshotSettings(
        ways=ways if ways is not None else 2, shots=shots if shots is not None else (1 if evaluating else 5),
        episodes=episodes if episodes is not None else 200, seed=seed, repeats=repeats, induction=induction,
        scoring=scoring.value, labels=labels.value, length_norm=length_norm, context_tokens=context_tokens,
        calibrate=calibrate, order=order.value, image_text=image_text.value,
        min_image_tokens=min_image_tokens, max_new_tokens=max_new_tokens,
    )
    job = FewshotJob(
        support=support, images=list(queries or []), query=query, model_dir=model, llm=llm, api_base=api_base,
        template=template, settings=settings, bpe_file=bpe_file, device=resolve_device(device), out=out,
        timeout=timeout, retries=retries, reuse_prefix=prefix_cache, allow_foreign_tokens=allow_foreign,
    )
    display = _Display(enabled=not quiet and sys.stderr.isatty())
    with display:
        result = run_fewshot(job, Progress(
            on_stage=display.stage, on_result=display.result,
            on_queries=lambda paths: _check_printable(paths, as_json, len(job.images) == 1),
        ))
    if isinstance(result, EvalSummary):
        _render_evaluation(result, as_json, out)
    else:
        _render_predictions(result, as_json, len(job.images) == 1)


def _render_predictions(run, as_json: bool, single_argument: bool) -> None:
    _budget_note(run.dropped.as_dict(), f"{run.supports} support images, {run.image_tokens} of {run.tokens_per_image} tokens per image")
    unanswered = sum(1 for p in run.predictions if p.label is None)
    if unanswered:
        sys.stderr.write(f"note: {unanswered} generated repl(ies) started with no label (printed as ?)\n")
    if as_json:
        sys.stdout.write(json.dumps(run.as_dict(), sort_keys=True) + "\n")
        return
    if single_argument and len(run.predictions) == 1:
        sys.stdout.write(f"{run.predictions[0].label or '?'}\n")
        return
    for prediction in run.predictions:
        sys.stdout.write(f"{prediction.path}\t{prediction.label or '?'}\n")


def _check_printable(paths: list[str], as_json: bool, single_argument: bool) -> None:
    """Refuse, before the LLM runs, query names that `path<TAB>label` lines cannot carry."""
    if not as_json and not (single_argument and len(paths) == 1):
        check_line_paths(paths, "use --json, which quotes every path, or rename the file")


def _render_evaluation(summary, as_json: bool, out: Optional[Path]) -> None:
    dropped = summary.dropped
    if dropped.get("episodes"):
        parts = []
        if dropped["repeats"]:
            parts.append(f"{dropped['repeats']} repeat block(s) dropped")
        if dropped["shortened_episodes"]:
            parts.append(f"image token text shortened in {dropped['shortened_episodes']} episode(s)")
        if dropped["shots"]:
            parts.append(f"{dropped['shots']} support image(s) dropped")
        sys.stderr.write(
            f"note: to fit the context window, {dropped['episodes']} of {summary.episodes} episodes were cut: "
            + "; ".join(parts) + "\n"
        )
    if summary.resumed:
        sys.stderr.write(f"note: {summary.resumed} episode(s) read back from {out}\n")
    if summary.unanswered:
        sys.stderr.write(f"note: {summary.unanswered} generated repl(ies) started with no label (counted wrong)\n")
    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict(), sort_keys=True) + "\n")
        return
    low, high = summary.interval
    sys.stdout.write(
        f"accuracy {100 * summary.accuracy:.1f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%) over {summary.episodes} "
        f"episodes, {summary.ways}-way {summary.shots}-shot; chance {100 * summary.chance:.1f}%\n"
    )
    sys.stderr.write(
        f"mean prompt {summary.mean_prompt_tokens:.0f} tokens, {summary.seconds_per_episode:.2f} s/episode\n"
    )
    _diagnostics_note(summary.diagnostics)


def _diagnostics_note(diagnostics: dict) -> None:
    """One stderr line: what the LLM answers, and where its right answers sit."""
    if not diagnostics:
        return
    answered = ", ".join(f"{label} {100 * share:.0f}%" for label, share in list(diagnostics["predicted"].items())[:5])
    positions = ", ".join(
        f"#{int(position) + 1} {100 * cell['accuracy']:.0f}%" for position, cell in diagnostics["accuracy_by_label_position"].items()
    )
    line = f"answers: {answered}; accuracy by the right label's place in the list: {positions}"
    if diagnostics.get("answers_last_example") is not None:
        line += f"; answers the last example's class {100 * diagnostics['answers_last_example']:.0f}%"
    if diagnostics.get("mean_margin") is not None:
        line += f"; mean margin {diagnostics['mean_margin']:.2f}"
    sys.stderr.write(line + "\n")


def _budget_note(dropped: dict, kept: str) -> None:
    parts = []
    if dropped["repeats"]:
        parts.append(f"{dropped['repeats']} repeat block(s)")
    if dropped["image_tokens"]:
        parts.append(f"{dropped['image_tokens']} token(s) from every image's text")
    if dropped["shots"]:
        parts.append(f"{dropped['shots']} support image(s)")
    if parts:
        sys.stderr.write(f"note: to fit the context window, dropped {', '.join(parts)} ({kept})\n")


class _Display:
    """Stage lines and an episode bar on stderr, only for a person at a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.correct = 0

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=Console(stderr=True), transient=True,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            return self.progress.__exit__(*exc)
        return False

    def stage(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]{message}[/dim]")

    def result(self, record: dict, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.task is None:
            self.task = self.progress.add_task("episodes", total=total, status="")
        self.correct += 1 if record["correct"] else 0
        self.progress.update(self.task, completed=done, status=f"acc {self.correct / done:.3f}")
