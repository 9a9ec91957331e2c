"""`lqae fewshot`: label images with a text-only LLM shown labelled support images as token text,
or evaluate it on N-way K-shot episodes (Frozen protocol)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lqae.fewshot.backends import DEFAULT_LLM
from lqae.fewshot.settings import (
    DEFAULT_EPISODES, DEFAULT_GLOBAL_WEIGHT, DEFAULT_WAYS, EVALUATION_SHOTS, IMAGE_TEXTS, LABELLING_SHOTS, LABEL_MODES,
    ORDERS, SCORING, FewshotSettings,
)
from lqae_cli.common import check_line_paths, handle_errors
from lqae_cli.options import AllowForeignOption, DeviceOption, JsonOption, ModelOption, choice_enum, resolve_device
from lqae_cli.progress import Bars, wanted

Scoring = choice_enum("Scoring", SCORING)
Order = choice_enum("Order", ORDERS)
ImageText = choice_enum("ImageText", IMAGE_TEXTS)
LabelMode = choice_enum("LabelMode", LABEL_MODES)


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
    model: ModelOption = None,
    llm: str = typer.Option(
        DEFAULT_LLM, help="auto (an LLM server $LQAE_LLM or OPENAI_BASE_URL + OPENAI_MODEL names, else overlap), "
        "hf:NAME_OR_PATH (folder or .gguf), openai:MODEL, or overlap (no LLM).",
    ),
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
        Order.random, help="Support order: random (as drawn; lets a local model reuse one prompt prefix for every "
        "query it labels) or similar-last (most token overlap with the query last: the answer's position then "
        "follows the overlap baseline's, which an LLM's position bias can help or defeat).",
    ),
    image_text: ImageText = typer.Option(
        ImageText.sequence, help="Token text per image: sequence (global words, then patch order), frequent (global "
        "words, then distinct patch tokens, most frequent first; shorter) or global (the global words alone).",
    ),
    global_weight: float = typer.Option(
        DEFAULT_GLOBAL_WEIGHT, min=0.0, help="How many patch words a shared global word counts for in the token "
        "overlap (--llm overlap and --order similar-last); models without global tokens ignore it.",
    ),
    ways: Optional[int] = typer.Option(None, help=f"Classes per episode (evaluation; default {DEFAULT_WAYS})."),
    shots: Optional[int] = typer.Option(
        None,
        help=f"Support images per class (evaluation default {EVALUATION_SHOTS}; labelling default: up to "
        f"{LABELLING_SHOTS}).",
    ),
    episodes: Optional[int] = typer.Option(None, help=f"Episodes to evaluate (default {DEFAULT_EPISODES})."),
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
    as_json: JsonOption = False,
    device: DeviceOption = "auto",
    timeout: float = typer.Option(60.0, help="Seconds per HTTP request (openai backend)."),
    retries: int = typer.Option(4, min=0, help="Retries with back-off on 429/5xx/unreachable (openai backend)."),
    concurrency: int = typer.Option(
        1, min=1, help="Requests in flight at once (openai backend): episodes or queries are answered in parallel; "
        "results, their order and --out resume are the same as with 1.",
    ),
    prefix_cache: bool = typer.Option(
        True, "--prefix-cache/--no-prefix-cache", help="Reuse the shared prompt prefix's key/values (local models)."
    ),
    allow_foreign: AllowForeignOption = False,
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),  # no -q: that is --query
) -> None:
    """Label images with an LLM shown labelled support images as token text, or evaluate it on episodes.

    Example: lqae fewshot --support data/digits/train data/digits/val/seven/0044.png --model runs/digits
    Evaluate: lqae fewshot --support train/ --query val/ --model runs/digits --ways 5 --shots 1 --episodes 200 --seed 0
    A server, 8 requests at a time: lqae fewshot ... --llm openai:MODEL --api-base http://localhost:8000/v1 --concurrency 8
    One query prints just its label; several print `path<TAB>label` lines. Templates: see prompts/README.md.
    """
    from lqae.fewshot.evaluation import EvalSummary
    from lqae.fewshot.run import FewshotCallbacks, FewshotJob, run_fewshot

    settings = FewshotSettings.with_defaults(
        query is not None, ways=ways, shots=shots, episodes=episodes, seed=seed, repeats=repeats,
        induction=induction, scoring=scoring.value, labels=labels.value, length_norm=length_norm,
        context_tokens=context_tokens, calibrate=calibrate, order=order.value, image_text=image_text.value,
        global_weight=global_weight,
        min_image_tokens=min_image_tokens, max_new_tokens=max_new_tokens,
    )
    job = FewshotJob(
        support=support, images=list(queries or []), query=query, model_dir=model, llm=llm, api_base=api_base,
        template=template, settings=settings, bpe_file=bpe_file, device=resolve_device(device), out=out,
        timeout=timeout, retries=retries, reuse_prefix=prefix_cache, allow_foreign_tokens=allow_foreign,
        concurrency=concurrency,
    )
    with Bars(wanted(quiet)) as bars:
        result = run_fewshot(job, FewshotCallbacks(
            on_stage=bars.note, on_result=_accuracy_bar(bars),
            on_queries=lambda paths: _check_printable(paths, as_json, len(job.images) == 1),
            on_note=lambda line: sys.stderr.write(f"note: {line}\n"),
        ))
    if isinstance(result, EvalSummary):
        _render_evaluation(result, as_json, out)
    else:
        _render_predictions(result, as_json, len(job.images) == 1, out)


def _accuracy_bar(bars):
    """The episode callback: a bar with the running accuracy."""
    correct = 0

    def on_result(record: dict, done: int, total: int) -> None:
        nonlocal correct
        correct += 1 if record["correct"] else 0
        bars.update("episodes", done, total, status=f"acc {correct / done:.3f}")

    return on_result


def _render_predictions(run, as_json: bool, single_argument: bool, out: Optional[Path]) -> None:
    _budget_note(run.dropped.as_dict(), f"{run.supports} support images, {run.image_tokens} of {run.tokens_per_image} tokens per image")
    if run.resumed:
        sys.stderr.write(f"note: {run.resumed} of {len(run.predictions)} answer(s) read back from {out}\n")
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
        parts = _counted(
            (dropped["repeats"], "{} repeat block(s) dropped"),
            (dropped["shortened_episodes"], "image token text shortened in {} episode(s)"),
            (dropped["shots"], "{} support image(s) dropped"),
        )
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
    prompt = f"mean prompt {summary.mean_prompt_tokens:.0f} tokens, " if summary.mean_prompt_tokens is not None else ""
    sys.stderr.write(f"{prompt}{summary.seconds_per_episode:.2f} s/episode\n")
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
    parts = _counted(
        (dropped["repeats"], "{} repeat block(s)"),
        (dropped["image_tokens"], "{} token(s) from every image's text"),
        (dropped["shots"], "{} support image(s)"),
    )
    if parts:
        sys.stderr.write(f"note: to fit the context window, dropped {', '.join(parts)} ({kept})\n")


def _counted(*items: tuple[int, str]) -> list[str]:
    """Each template filled with its count, leaving out the zero counts."""
    return [template.format(count) for count, template in items if count]
