"""Few-shot settings: every range check refuses, the protocol's defaults, and light imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lqae.errors import ConfigError
from lqae.fewshot.backends import OverlapBackend
from lqae.fewshot.image_text import PromptImageText
from lqae.fewshot.settings import (
    DEFAULT_EPISODES, DEFAULT_WAYS, EVALUATION_SHOTS, LABELLING_SHOTS, FewshotSettings,
)
from lqae.tokentext import decode_text


@pytest.mark.parametrize("name", ["episodes", "context_tokens", "min_image_tokens", "max_new_tokens", "shots"])
@pytest.mark.parametrize("value", [0, -3])
def test_counts_below_one_are_refused(name, value):
    settings = FewshotSettings(**{name: value})
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=f"{flag} must be at least 1, got {value}"):
        settings.check()
    with pytest.raises(ConfigError, match=flag):
        settings.for_backend(OverlapBackend())


def test_negative_repeats_are_refused():
    with pytest.raises(ConfigError, match="--repeats must be 0 or more, got -1"):
        FewshotSettings(repeats=-1).check()
    FewshotSettings(repeats=0, shots=None, context_tokens=None).check()  # the lowest allowed values pass


def test_protocol_defaults_differ_for_evaluation_and_labelling():
    evaluating = FewshotSettings.with_defaults(True)
    expected = (DEFAULT_WAYS, EVALUATION_SHOTS, DEFAULT_EPISODES)
    assert (evaluating.ways, evaluating.shots, evaluating.episodes) == expected
    assert (DEFAULT_WAYS, EVALUATION_SHOTS, DEFAULT_EPISODES) == (2, 1, 200)
    labelling = FewshotSettings.with_defaults(False, seed=3, order="random")
    assert labelling.shots == LABELLING_SHOTS == 5 and labelling.seed == 3 and labelling.order == "random"
    given = FewshotSettings.with_defaults(True, ways=5, shots=3, episodes=10)
    assert (given.ways, given.shots, given.episodes) == (5, 3, 10)
    assert FewshotSettings.with_defaults(False, shots=2).shots == 2


@pytest.mark.parametrize("given, named", [({"ways": 3}, "--ways"), ({"episodes": 5}, "--episodes"),
                                          ({"ways": 3, "episodes": 5}, "--ways and --episodes")])
def test_ways_and_episodes_apply_to_evaluation_only(given, named):
    with pytest.raises(ConfigError, match=f"{named} apply to evaluation"):
        FewshotSettings.with_defaults(False, **given)


class LineBreakTokenizer:
    """Stand-in LQAE tokenizer whose tokens hold line breaks and spaces of their own."""

    pieces = {0: "a\n", 1: "b", 2: "  c\t", 3: "d"}

    def decode(self, ids, **kwargs):
        return "".join(self.pieces[i] for i in ids)


def test_prompt_text_is_the_encode_text_form_cut_and_memoised():
    tokenizer = LineBreakTokenizer()
    text = PromptImageText(tokenizer)
    assert text([0, 1, 2, 3]) == decode_text(tokenizer, [0, 1, 2, 3]) == "a b  c d"  # spaces of the tokens kept
    assert text([0, 1, 2, 3], 2) == "a b"
    assert text([0, 1, 2, 3], 2) is text([0, 1], None)  # one decode per distinct cut
    assert PromptImageText(tokenizer, "frequent")([3, 1, 3, 0], 2) == "db"
    with pytest.raises(ConfigError, match="unknown image text"):
        PromptImageText(tokenizer, "shuffled")


def test_settings_and_backends_import_without_torch():
    code = (
        "import sys, lqae.fewshot.backends, lqae.fewshot.settings\n"
        "from lqae.fewshot.backends import DEFAULT_LLM, make_backend\n"
        "make_backend('overlap')\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "False False"
