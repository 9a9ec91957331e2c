"""Prompt templates: shipped files, parsing, rendering, errors."""

from __future__ import annotations

import pytest

from lqae.errors import ConfigError
from lqae.fewshot.prompts import TemplateError, list_templates, load_template, parse_template, render

SUPPORTS = [("templar pal", "seven"), ("citadel baba", "two")]


def test_shipped_templates_are_listed_and_load():
    names = list_templates()
    assert {"completion", "chat"} <= set(names)
    for name in names:
        template = load_template(name)
        assert template.name == name and template.example and template.query_cue


def test_completion_prompt_is_the_frozen_format():
    template = load_template("completion")
    prompts = render(template, ["seven", "two"], SUPPORTS, ["codex pal"], induction=True)
    assert len(prompts) == 1
    prompt = prompts[0]
    assert prompt.text == (
        "Answer with one of: seven, two.\n"
        "Input: templar pal\nOutput: seven\n###\n"
        "Input: citadel baba\nOutput: two\n###\n"
        "Input: codex pal\nOutput:"
    )
    assert prompt.delimiter == " "  # scored continuation is " seven"
    assert prompt.suffix == "Input: codex pal\nOutput:" and prompt.messages is None


def test_induction_off_and_repeats():
    template = load_template("completion")
    prompt = render(template, ["seven", "two"], SUPPORTS, ["q"], induction=False, repeats=2)[0]
    assert "Answer with one of" not in prompt.text
    assert prompt.text.count("Input: templar pal\nOutput: seven") == 3  # 1 + 2 repeats


def test_queries_share_one_prefix():
    template = load_template("completion")
    prompts = render(template, ["seven", "two"], SUPPORTS, ["q1 a", "q2 b", "q3 c"])
    assert len({p.prefix for p in prompts}) == 1
    assert [p.suffix.splitlines()[0] for p in prompts] == ["Input: q1 a", "Input: q2 b", "Input: q3 c"]


def test_chat_template_messages_and_formatter_split():
    template = load_template("chat")
    assert template.format == "chat" and template.delimiter == ""
    plain = render(template, ["seven", "two"], SUPPORTS, ["codex pal"])[0]
    roles = [m["role"] for m in plain.messages]
    assert roles == ["system", "user"]
    assert plain.messages[1]["content"].endswith("Input: codex pal\nOutput:")
    assert "Output: seven" in plain.messages[1]["content"]

    def chatml(messages):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"

    formatted = render(template, ["seven", "two"], SUPPORTS, ["codex pal", "other"], chat_format=chatml)
    assert formatted[0].prefix == formatted[1].prefix
    assert formatted[0].text == chatml(list(formatted[0].messages))
    assert formatted[0].suffix == "Input: codex pal\nOutput:<|im_end|>\n<|im_start|>assistant\n"


def test_placeholders_ways_shots_and_literal_braces(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(
        "format: completion\n[instruction]\n{ways} classes, {shots} each: {labels} {{json}}\n"
        "[example]\n<{text}> is {label}\n[query]\n<{text}> is{label} (end)\n"
    )
    template = load_template(path)
    assert template.name == "mine" and template.delimiter == ""
    prompt = render(template, ["a", "b"], [("x", "a")], ["y"], shots=3)[0]
    assert prompt.text == "2 classes, 3 each: a, b {json}\n<x> is a\n<y> is"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[example]\n{text} {colour}\n[query]\n{text} {label}\n", "unknown placeholder {colour}"),
        ("[example]\n{text} {label}\n[query]\n{text}\n", "exactly once"),
        ("[query]\n{text} {label}\n", "needs an [example] section"),
        ("format: poem\n[example]\n{text}\n[query]\n{text} {label}\n", "unknown format"),
        ("[instruction]\n{text}\n[example]\n{text}\n[query]\n{text} {label}\n", "unknown placeholder {text}"),
        ("hello\n[example]\n{text}\n[query]\n{text} {label}\n", "neither a comment nor a setting"),
        ("[system]\nhi\n[example]\n{text}\n[query]\n{text} {label}\n", "needs `format: chat`"),
    ],
)
def test_bad_templates_say_what_is_wrong(text, message):
    with pytest.raises(TemplateError, match=message.replace("[", r"\[").replace("{", r"\{").replace("}", r"\}")):
        parse_template(text)


def test_unknown_template_name_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        load_template("nope")
    assert "unknown template 'nope'" in str(info.value)
    for name in list_templates():
        assert name in str(info.value)


def test_section_header_lines_and_hashes_inside_sections_are_text():
    template = parse_template("# comment\n[example]\n### {text}\n# not a comment\n[query]\n{text} ->{label}\n")
    assert template.example == "### {text}\n# not a comment"
