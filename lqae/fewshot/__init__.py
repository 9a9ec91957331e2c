"""Few-shot image classification with a text-only LLM reading LQAE token text (Frozen protocol).

Modules, one job each:
- `settings`: FewshotSettings, the allowed values and the protocol's defaults (no torch);
- `episodes`: token pools, episode sampling; `image_text`: an image's prompt text (PromptImageText);
- `prompts`: templates rendered into prompts; `budget`: fitting a prompt into the context window;
- `backends`: the LLMs (`hf`, `openai`) and the `overlap` baseline behind one interface;
- `support`: a support set fitted once, answering queries (scoring, generation, calibration);
- `evaluation`: accuracy over N-way K-shot episodes, diagnostics; `labelling`: labels for new images;
- `results`: the resumable results file; `run`: the `lqae fewshot` entry point.
torch and transformers load only with the modules that need them.
"""

from __future__ import annotations

from lqae.lazy import lazy_exports

_LAZY = {  # submodule -> the public names it provides: the one list of this package's names
    "lqae.fewshot.run": ("FewshotJob", "FewshotCallbacks", "run_fewshot"),
    "lqae.fewshot.settings": ("FewshotSettings",),
    "lqae.fewshot.support": ("SupportSet",),
    "lqae.fewshot.evaluation": ("EvalSummary", "evaluate_episodes", "wilson_interval"),
    "lqae.fewshot.labelling": ("QueryLabel", "LabelRun", "label_queries"),
    "lqae.fewshot.results": ("ResultsFile",),
    "lqae.fewshot.episodes": ("TokenPool", "sample_episode"),
    "lqae.fewshot.prompts": ("Template", "Prompt", "list_templates", "load_template", "render"),
    "lqae.fewshot.image_text": ("PromptImageText",),
    "lqae.fewshot.budget": ("BudgetError", "fit_prompt", "load_tiktoken"),
    "lqae.fewshot.backends": (
        "Backend", "OverlapBackend", "HFBackend", "OpenAIBackend", "make_backend", "DEFAULT_LLM",
    ),
}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
