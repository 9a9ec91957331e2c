"""Prompt templates: text files in `prompts/` (package `lqae.prompts`), rendered into prompts. How an
image reads as prompt text is `lqae.fewshot.image_text`.

A rendered `Prompt` is split in two: a prefix shared by every query of a support set (instruction +
examples) and a query suffix ending at the answer cue. Local backends run the prefix once and reuse
its key/values for every query and label. The template format is documented in prompts/README.md.
"""

from __future__ import annotations

import importlib.resources
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from lqae.errors import ConfigError

SECTIONS = ("system", "instruction", "example", "query")
FORMATS = ("completion", "chat")
DEFAULT_TEMPLATE = "completion"
_EPISODE_FIELDS = ("labels", "ways", "shots")
_ALLOWED = {
    "system": _EPISODE_FIELDS,
    "instruction": _EPISODE_FIELDS,
    "example": _EPISODE_FIELDS + ("text", "label"),
    "query": _EPISODE_FIELDS + ("text", "label"),
}
_HEADER = re.compile(r"^\[(\w+)\]\s*$")
_SETTING = re.compile(r"^(\w+)\s*:\s*(.*?)\s*$")
_SENTINEL = "\x00LQAE-QUERY\x00"  # marks where the query starts when a chat template is applied

ChatFormatter = Callable[[list[dict]], str]  # messages -> prompt text ending where the reply starts


class TemplateError(ConfigError):
    """A prompt template that cannot be found or parsed."""


@dataclass(frozen=True)
class Template:
    """A parsed template file."""

    name: str
    format: str  # "completion" or "chat"
    system: str  # chat only; "" when absent
    instruction: str  # task induction line(s); "" when absent
    example: str  # one support: {text}, {label}
    query_cue: str  # the query section up to the whitespace before {label}
    delimiter: str  # whitespace between the cue and the label ("" for chat)


@dataclass(frozen=True)
class Prompt:
    """One query's prompt. prefix + suffix is the text an LLM reads; a label is scored after it."""

    prefix: str  # shared by every query of the same support set: instruction + examples
    suffix: str  # this query, up to the answer cue
    delimiter: str  # put in front of each label when scoring (" " for `Output: cat`)
    messages: tuple[dict, ...] | None = None  # chat templates: the messages, for chat APIs

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


def list_templates() -> list[str]:
    """Names of the templates shipped with lqae."""
    return sorted(p.name[:-4] for p in _template_dir().iterdir() if p.name.endswith(".txt"))


def load_template(name_or_path: str | Path) -> Template:
    """A shipped template by name (`completion`, `chat`) or any template file by path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise TemplateError(
                f"template {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                "save it as UTF-8"
            ) from None
        return parse_template(text, name=path.stem)
    names = list_templates()
    if str(name_or_path) in names:
        text = _template_dir().joinpath(f"{name_or_path}.txt").read_text(encoding="utf-8")
        return parse_template(text, name=str(name_or_path))
    raise TemplateError(
        f"unknown template {str(name_or_path)!r}; available: {', '.join(names)} (or pass the path of a template file)"
    )


def parse_template(text: str, name: str = "custom") -> Template:
    """Parse the sectioned format of prompts/README.md."""
    settings: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and header.group(1) in SECTIONS:
            current = header.group(1)
            if current in sections:
                raise TemplateError(f"template {name!r}: section [{current}] appears twice")
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            setting = _SETTING.match(line.strip())
            if not setting:
                raise TemplateError(
                    f"template {name!r}: {line.strip()!r} before the first section is neither a comment nor a "
                    f"setting; sections are {', '.join(f'[{s}]' for s in SECTIONS)}"
                )
            settings[setting.group(1)] = setting.group(2)
    unknown = sorted(set(settings) - {"format"})
    if unknown:
        raise TemplateError(f"template {name!r}: unknown setting(s) {', '.join(unknown)}; known: format")
    fmt = settings.get("format", "completion")
    if fmt not in FORMATS:
        raise TemplateError(f"template {name!r}: unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    body = {key: "\n".join(lines).lstrip("\n").rstrip() for key, lines in sections.items()}
    for required in ("example", "query"):
        if not body.get(required):
            raise TemplateError(f"template {name!r} needs an [{required}] section (see prompts/README.md)")
    if fmt == "completion" and body.get("system"):
        raise TemplateError(f"template {name!r}: [system] needs `format: chat`")
    for section, content in body.items():
        _check_fields(name, section, content)
    query = body["query"]
    if query.count("{label}") != 1:
        raise TemplateError(f"template {name!r}: [query] must contain {{label}} exactly once (the answer position)")
    before = query.split("{label}")[0]
    cue = before.rstrip()
    delimiter = before[len(cue):] if fmt == "completion" else ""
    if not cue:
        raise TemplateError(f"template {name!r}: [query] needs text (at least {{text}}) before {{label}}")
    return Template(
        name=name, format=fmt, system=body.get("system", ""), instruction=body.get("instruction", ""),
        example=body["example"], query_cue=cue, delimiter=delimiter,
    )


def render(
    template: Template,
    labels: Sequence[str],
    supports: Sequence[tuple[str, str]],
    queries: Sequence[str],
    *,
    induction: bool = True,
    shots: int = 1,
    repeats: int = 0,
    chat_format: ChatFormatter | None = None,
) -> list[Prompt]:
    """Prompts for each query text, sharing one prefix.

    labels: the candidate labels as the LLM sees them; supports: (token text, label) in prompt order,
    written 1 + `repeats` times; chat_format turns chat messages into the model's prompt text (local
    models); without it a chat prompt's text is the plain messages joined (used for counting).
    """
    fields = {"labels": ", ".join(labels), "ways": len(labels), "shots": shots}
    head = [_fill(template.instruction, fields)] if induction and template.instruction else []
    block = [_fill(template.example, fields, text=text, label=label) for text, label in supports]
    head += block * (1 + repeats)
    cues = [_fill(template.query_cue, fields, text=text) for text in queries]
    if template.format == "completion":
        prefix = "\n".join(head) + "\n" if head else ""
        return [Prompt(prefix, cue, template.delimiter) for cue in cues]

    system = _fill(template.system, fields) if template.system else ""

    def messages(user: str) -> tuple[dict, ...]:
        head_messages = ({"role": "system", "content": system},) if system else ()
        return head_messages + ({"role": "user", "content": user},)

    user_head = "\n".join(head) + "\n" if head else ""
    if chat_format is None:
        prefix = (system + "\n" if system else "") + user_head
        return [Prompt(prefix, cue, "", messages(user_head + cue)) for cue in cues]
    formatted = chat_format(list(messages(user_head + _SENTINEL)))
    if formatted.count(_SENTINEL) != 1:
        raise TemplateError("the model's chat template changed the message text; use a completion template")
    prefix, tail = formatted.split(_SENTINEL)
    return [Prompt(prefix, cue + tail, "", messages(user_head + cue)) for cue in cues]


def _fill(section: str, fields: dict, **values) -> str:
    return section.format_map({**fields, **values})


def _check_fields(name: str, section: str, content: str) -> None:
    allowed = _ALLOWED[section]
    try:
        parsed = list(string.Formatter().parse(content))
    except ValueError as exc:
        raise TemplateError(f"template {name!r} [{section}]: {exc} (write {{{{ and }}}} for literal braces)") from exc
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field in allowed and (spec or conversion):
            written = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise TemplateError(
                f"template {name!r} [{section}]: {written} takes no conversion or format spec; write {{{field}}}"
            )
        if field not in allowed:
            raise TemplateError(
                f"template {name!r} [{section}]: unknown placeholder {{{field}}}; "
                f"known here: {', '.join('{' + f + '}' for f in allowed)}"
            )


def _template_dir():
    try:
        return importlib.resources.files("lqae.prompts")
    except ModuleNotFoundError:  # running from a source tree that was never installed
        return Path(__file__).resolve().parents[2] / "prompts"
