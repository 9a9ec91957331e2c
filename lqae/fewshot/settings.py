"""Few-shot protocol and scoring settings, with their allowed values and defaults (no torch here:
the CLI builds its choices from these constants)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from lqae.errors import ConfigError

if TYPE_CHECKING:
    from lqae.fewshot.backends.base import Backend

SCORING = ("loglik", "generate", "constrained")
LABEL_MODES = ("real", "open", "letters")
ORDERS = ("random", "similar-last")
IMAGE_TEXTS = ("sequence", "frequent", "global")

DEFAULT_WAYS = 2  # classes per episode (evaluation)
DEFAULT_GLOBAL_WEIGHT = 4.0  # a global word stands for the whole image; measured in the README ("Global tokens")
DEFAULT_EPISODES = 200
EVALUATION_SHOTS = 1  # supports per class in an episode (the Frozen protocol's 1-shot)
LABELLING_SHOTS = 5  # supports per class when labelling new images (fewer where a class has fewer)


@dataclass
class FewshotSettings:
    """Protocol and scoring settings shared by labelling and evaluation."""

    ways: int = DEFAULT_WAYS  # classes per episode (evaluation)
    shots: int | None = EVALUATION_SHOTS  # supports per class; None = every support image (labelling)
    episodes: int = DEFAULT_EPISODES  # episodes to evaluate
    seed: int = 0  # episode sampling, support choice, open-label assignment
    repeats: int = 0  # extra copies of the support block (Frozen protocol: 0, 1, 3, 5)
    induction: bool = True  # the template's [instruction] line before the examples
    scoring: str = "loglik"  # one of SCORING
    labels: str = "real"  # "real" (class folder names), "open" (nonsense words), "letters" (A, B, ...)
    # divide out the label prior measured after content-free queries; None = on wherever it applies
    # (loglik scoring with an LLM), as it helps most with the default LLM (README, "Measured figures")
    calibrate: bool | None = None
    order: str = "random"  # "random" (as drawn) or "similar-last" (most token overlap with the query last)
    image_text: str = "sequence"  # "sequence" (global words, then patch order), "frequent" (global words, then
    # distinct patch tokens, most frequent first) or "global" (the global words alone)
    global_weight: float = DEFAULT_GLOBAL_WEIGHT  # a shared global word counts this many patch words (overlap, order)
    length_norm: bool = False  # loglik per label token instead of summed
    context_tokens: int | None = None  # None = the backend's window
    min_image_tokens: int | None = None  # shortest token text per image when fitting; None = half
    max_new_tokens: int | None = None  # generation; None = longest label + 4 tokens

    @classmethod
    def with_defaults(
        cls,
        evaluating: bool,
        ways: int | None = None,
        shots: int | None = None,
        episodes: int | None = None,
        **settings,
    ) -> "FewshotSettings":
        """Settings for evaluating on episodes or for labelling new images, the protocol's defaults
        taken where a value is None: DEFAULT_WAYS, DEFAULT_EPISODES, and EVALUATION_SHOTS or
        LABELLING_SHOTS. Ways and episodes given for labelling are a ConfigError (it uses every class)."""
        if not evaluating:
            given = [name for name, value in (("--ways", ways), ("--episodes", episodes)) if value is not None]
            if given:
                raise ConfigError(
                    f"{' and '.join(given)} apply to evaluation with --query DIR; labelling uses every class"
                )
        return cls(
            ways=DEFAULT_WAYS if ways is None else ways,
            shots=shots if shots is not None else EVALUATION_SHOTS if evaluating else LABELLING_SHOTS,
            episodes=DEFAULT_EPISODES if episodes is None else episodes,
            **settings,
        )

    def check(self) -> None:
        """ConfigError for a value out of range or not among the allowed ones."""
        choices = (("scoring", self.scoring, SCORING), ("label mode", self.labels, LABEL_MODES),
                   ("image text", self.image_text, IMAGE_TEXTS), ("order", self.order, ORDERS))
        for what, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
        for name in ("episodes", "context_tokens", "min_image_tokens", "max_new_tokens", "shots"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.global_weight < 0:
            raise ConfigError(f"--global-weight must be 0 or more, got {self.global_weight}")
        if self.repeats < 0:
            raise ConfigError(f"--repeats must be 0 or more, got {self.repeats}")
        if self.calibrate and self.scoring != "loglik":
            raise ConfigError("--calibrate divides out the label prior of log-likelihood scores; use --scoring loglik")

    def for_backend(self, backend: "Backend") -> "FewshotSettings":
        """A checked copy with the automatic choices made (calibration on for loglik scoring by an LLM);
        settings the backend cannot honour are a ConfigError."""
        self.check()
        if self.calibrate and not backend.reads_text:
            raise ConfigError(f"--calibrate measures an LLM's label prior; {backend.name} reads no prompt")
        if self.scoring == "constrained" and not backend.supports_constrained:
            raise ConfigError(f"{backend.name} cannot restrict generation to the labels; use --scoring loglik or generate")
        calibrate = self.calibrate if self.calibrate is not None else self.scoring == "loglik" and backend.reads_text
        return replace(self, calibrate=calibrate)
