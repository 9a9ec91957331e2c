"""One entry point for `lqae fewshot`: load the sources, the template and the backend, then label
new images or evaluate on episodes."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lqae.checkpoint import load_model
from lqae.codec import encode_images
from lqae.images.source import collect_images, found_in_folders
from lqae.errors import ConfigError, DataError
from lqae.fewshot.backends import DEFAULT_LLM, Backend, BackendOptions, make_backend, resolve_llm
from lqae.fewshot.concurrency import check_concurrency
from lqae.fewshot.episodes import TokenPool, pool_from_dataset
from lqae.fewshot.evaluation import EpisodeCallback, EvalSummary, evaluate_episodes
from lqae.fewshot.labelling import LabelRun, QueryLabel, label_queries
from lqae.fewshot.prompts import DEFAULT_TEMPLATE, Template, load_template
from lqae.fewshot.results import ResultsFile, fingerprint
from lqae.fewshot.settings import FewshotSettings
from lqae.images.files import IMAGE_EXTENSIONS, check_class_names
from lqae.model.lm import load_tokenizer
from lqae.model.lm_files import read_light_tokenizer
from lqae.provenance import check_same_weights
from lqae.images.source import scan_images
from lqae.tokendata import encode_folder, is_token_dataset, read_token_dataset

ENCODE_BATCH = 64  # images per LQAE forward pass


@dataclass
class FewshotJob:
    """What `lqae fewshot` was asked to do."""

    support: Path  # image folder with class sub-folders, or a token dataset (.safetensors)
    images: list[Path] = field(default_factory=list)  # labelling: images, folders or token datasets
    query: Path | None = None  # evaluation: query folder or token dataset
    model_dir: Path | None = None  # LQAE checkpoint, needed to encode images
    llm: str = DEFAULT_LLM
    api_base: str | None = None
    template: str = DEFAULT_TEMPLATE
    settings: FewshotSettings = field(default_factory=FewshotSettings)
    bpe_file: Path | None = None
    device: str = "cpu"
    out: Path | None = None  # JSON lines, resumable
    timeout: float = 60.0
    retries: int = 4
    reuse_prefix: bool = True
    allow_foreign_tokens: bool = False  # token datasets of other weights than the model's / each other's
    concurrency: int = 1  # episodes or queries answered at once (server backends); results are the same


@dataclass
class FewshotCallbacks:
    """What `run_fewshot` reports to the caller's display; the library never prints."""

    on_stage: Callable[[str], None] | None = None  # "encoding support", "loading LLM", ...
    on_result: EpisodeCallback | None = None  # evaluation: (record, done, total) per episode
    on_label: Callable[[QueryLabel], None] | None = None  # labelling: per query
    on_queries: Callable[[list[str]], None] | None = None  # labelling: the query paths, before any LLM work
    on_note: Callable[[str], None] | None = None  # a line the user should read (which LLM `--llm auto` chose)


def run_fewshot(job: FewshotJob, callbacks: FewshotCallbacks | None = None) -> LabelRun | EvalSummary:
    """Label `job.images`, or evaluate on episodes drawn from `job.query`."""
    callbacks = callbacks or FewshotCallbacks()
    stage = callbacks.on_stage or (lambda message: None)
    if job.query is not None and job.images:
        raise ConfigError("give query images to label, or --query DIR to evaluate on episodes (not both)")
    if job.query is None and not job.images:
        raise ConfigError("nothing to do: give query images to label, or --query DIR to evaluate on episodes")
    job.settings.check()
    template = load_template(job.template)
    sources = Sources(job.model_dir, job.device, stage, job.allow_foreign_tokens)
    support = sources.pool(job.support, "support")
    if job.query is not None:
        queries = sources.pool(job.query, "query")
    else:
        queries = sources.images(job.images)
        if callbacks.on_queries:
            callbacks.on_queries(queries.paths)
    _check_compatible(support, queries, job)
    for pool, role in ((support, "support"), (queries, "query")):
        check_labels(pool.classes, role, job.settings.labels)
    tokenizer = sources.tokenizer(support.lm_name)

    llm, why = resolve_llm(job.llm)
    if why and callbacks.on_note:
        callbacks.on_note(f"--llm auto: {llm} ({why})")
    stage(f"loading {llm}")
    options = BackendOptions(
        device=job.device, api_base=job.api_base, timeout=job.timeout, retries=job.retries, bpe_file=job.bpe_file,
        reuse_prefix=job.reuse_prefix,
    )
    backend = make_backend(llm, options)
    _check_template(template, backend, job.settings)
    job.settings.for_backend(backend)  # refuse what cannot apply before any work
    check_concurrency(job.concurrency, backend)
    # the data itself, not only its paths: another model, a retrained one or a re-encoded token
    # dataset at the same path must not resume from these results
    run = fingerprint(
        mode="evaluate" if job.query is not None else "predict", support=_source_id(job.support),
        query=_source_id(job.query) if job.query is not None else None, llm=llm, api_base=job.api_base,
        template=asdict(template), settings={k: v for k, v in asdict(job.settings).items() if k != "episodes"},
        support_data=support.digest(), query_data=queries.digest() if job.query is not None else queries.weights,
    )
    key = "episode" if job.query is not None else ("query", "content")
    with (ResultsFile(job.out, run, key) if job.out else contextlib.nullcontext()) as results:
        if job.query is not None:
            stage("evaluating")
            return evaluate_episodes(
                support, queries, backend, template, job.settings, tokenizer, results, callbacks.on_result,
                job.concurrency,
            )
        stage("classifying")
        return label_queries(
            support, queries, backend, template, job.settings, tokenizer, results, callbacks.on_label, job.concurrency
        )


class Sources:
    """Turns folders, image files and token datasets into TokenPools, loading the LQAE only when needed."""

    def __init__(
        self, model_dir: Path | None, device: str, stage: Callable[[str], None], allow_foreign: bool = False
    ) -> None:
        self.model_dir, self.device, self.stage, self.allow_foreign = model_dir, device, stage, allow_foreign
        self._model = None

    def model(self, why: str):
        """The LQAE, loaded for encoding only (no LM layers, no MLM head) on first use."""
        if self._model is None:
            if self.model_dir is None:
                raise DataError(f"{why} holds images: an LQAE checkpoint (--model RUN_DIR or $LQAE_MODEL) is needed to encode them")

            self.stage(f"loading LQAE {self.model_dir}")
            self._model = load_model(self.model_dir, self.device, encode_only=True)
        return self._model

    def pool(self, source: Path, role: str) -> TokenPool:
        """Support or query side: a token dataset, or an image folder with class sub-folders (encoded)."""
        if is_token_dataset(source):
            return pool_from_dataset(read_token_dataset(source), f"--{role} {source}")
        if not Path(source).exists():
            raise DataError(f"--{role} {source} does not exist (give an image folder or a token dataset .safetensors)")
        folder = scan_images(source)
        if not folder.classes:
            raise DataError(f"--{role} {source} has no class sub-folders; it needs one sub-folder per class (the folder name is the label)")
        model = self.model(f"--{role} {source}")
        self.stage(f"encoding {len(folder)} {role} images")
        return pool_from_dataset(encode_folder(model, folder, ENCODE_BATCH), f"--{role} {source}")

    def images(self, paths: list[Path]) -> TokenPool:
        """Query images to label, in the order given: image files, folders of images (recursive), or
        token datasets (every row). Unreadable images inside folders are skipped and named."""
        queries: list[tuple[str, list[int] | None]] = []  # (name, ids); ids None until the image is encoded
        lm_name, files, written_by, global_tokens = None, [], [], 0
        for path in map(Path, paths):
            if is_token_dataset(path):
                dataset = read_token_dataset(path)
                written_by.append((f"query tokens {path}", dataset.weights))
                global_tokens = dataset.global_tokens
                queries += [(str(name), row) for name, row in zip(dataset.paths, dataset.ids.tolist())]
                lm_name = lm_name or str(dataset.model_config.get("lm_name", ""))
                continue
            if path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"{path} is not an image ({', '.join(IMAGE_EXTENSIONS)}) or a token dataset (.safetensors)")
            for image in collect_images([path]):
                files.append(image)
                queries.append((str(image), None))
        if files:
            model = self.model(f"query {files[0]}")
            self.stage(f"encoding {len(files)} query images")
            encoded = {  # path -> ids (L,); images that could not be decoded are missing
                str(image): row
                for chunk, batch_ids in encode_images(model, files, ENCODE_BATCH, skip_unreadable=found_in_folders(paths))
                for image, row in zip(chunk, batch_ids.tolist())
            }
            queries = [(name, ids if ids is not None else encoded.get(name)) for name, ids in queries]
            queries = [(name, ids) for name, ids in queries if ids is not None]
            lm_name = lm_name or model.config.lm_name
            global_tokens = model.config.global_tokens
            written_by.insert(0, ("this model", model.weights_fingerprint))
        known = [(source, weights) for source, weights in written_by if weights]
        for source, weights in known[1:]:
            check_same_weights(
                weights, known[0][1], source, known[0][0], "encode every query with one LQAE checkpoint", self.allow_foreign
            )
        if not queries:
            raise DataError("none of the query images could be read")
        names, ids = [name for name, _ in queries], [row for _, row in queries]
        return TokenPool(ids, [-1] * len(ids), [], names, lm_name or "", known[0][1] if known else None, global_tokens)

    def tokenizer(self, lm_name: str):
        """The tokenizer that turns LQAE token ids into token text."""
        if self._model is not None and self._model.config.lm_name == lm_name:
            return self._model.tokenizer
        if not lm_name:
            raise DataError("the token dataset does not name its LM (model_config.lm_name); re-encode it with `lqae encode`")

        light = read_light_tokenizer(lm_name)  # tokenizer.json alone, without importing transformers
        return light if light is not None else load_tokenizer(lm_name)


def _check_compatible(support: TokenPool, queries: TokenPool, job: FewshotJob) -> None:
    if queries.lm_name and support.lm_name and queries.lm_name != support.lm_name:
        raise DataError(
            f"support tokens come from LM {support.lm_name!r} but query tokens from {queries.lm_name!r}; "
            "encode both with the same LQAE checkpoint"
        )
    check_same_weights(
        queries.weights, support.weights, "the query tokens", "the support tokens'",
        "encode both with the same LQAE checkpoint", job.allow_foreign_tokens,
    )
    if len(queries) and (queries.tokens_per_image, queries.global_tokens) != (support.tokens_per_image, support.global_tokens):
        raise DataError(
            f"support images have {support.tokens_per_image} tokens each ({support.global_tokens} global) but queries "
            f"{queries.tokens_per_image} ({queries.global_tokens} global); encode both with the same LQAE checkpoint"
        )


def check_labels(classes: list[str], role: str, labels: str) -> None:
    """Class (folder) names become labels in `PATH<TAB>LABEL` lines and in the prompt: the rule of
    `check_class_names` (no control characters), and, when the LLM is shown the real names, no commas
    (the instruction lists the labels comma-separated)."""
    check_class_names(classes, role)
    for name in classes:
        if labels == "real" and "," in name:
            raise DataError(
                f"{role} class {name!r} holds a comma, which makes the prompt's comma-separated list of labels "
                "ambiguous; rename the folder, or pass --labels letters (or open)"
            )


def _check_template(template: Template, backend: Backend, settings: FewshotSettings) -> None:
    if template.format != "chat" or not backend.reads_text:
        return
    if not backend.supports_chat():
        raise ConfigError(f"{backend.name} has no chat template; use a completion template (--template completion)")
    if settings.scoring == "loglik" and not backend.supports_chat_loglik:
        raise ConfigError(
            f"chat templates cannot be scored by log-likelihood through {backend.name} (/v1/completions takes "
            "plain text); use --scoring generate or --template completion"
        )


def _source_id(path: Path | None) -> str | None:
    return str(Path(path).resolve()) if path is not None else None
