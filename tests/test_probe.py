"""`lqae probe`: layer selection, feature extraction, head training, baselines, save/apply, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model_config, tiny_train_config, write_class_images
from lqae.checkpoint import load_model, save_checkpoint
from lqae.images.files import load_image, scan_image_folder
from lqae.errors import ConfigError, DataError
from lqae.model import LQAE
from lqae.probe import ProbeConfig, extract_features, feature_dim, layer_counts, load_probe, load_split, parse_layers, run_probe, train_head
from lqae.tokendata import encode_folder, write_token_dataset
from lqae_cli.app import app

COLOURS = ("red", "blue", "green")
runner = CliRunner()


@pytest.fixture
def splits(tmp_path) -> tuple[Path, Path]:
    """Colour classes, linearly separable in pixel space; VAL drawn with another seed."""
    train = write_class_images(tmp_path / "train", classes=COLOURS, per_class=8, seed=0)
    val = write_class_images(tmp_path / "val", classes=COLOURS, per_class=10, seed=1)  # 1 in 10 is grayscale
    return train, val


def invoke(*args: str):
    return runner.invoke(app, ["probe", *map(str, args)])


def probe_json(*args) -> dict:
    result = invoke(*args, "--json", "--quiet", "--epochs", "40")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)  # stdout holds the JSON object and nothing else


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- layer selection -------------------------------------------------------------------------------
def test_parse_layers_groups_lists_and_negative_indices():
    counts = {"lm": 3, "enc": 2}
    assert parse_layers("lm", counts) == ["lm:0", "lm:1", "lm:2"]
    assert parse_layers("encoder", counts) == ["enc:0", "enc:1"]
    assert parse_layers("all", counts) == ["lm:0", "lm:1", "lm:2", "enc:0", "enc:1"]
    assert parse_layers("lm:0, lm:-1,enc:1,lm:2", counts) == ["lm:0", "lm:2", "enc:1"]  # repeats dropped
    assert parse_layers("encoder:-2,lm", counts) == ["enc:0", "lm:0", "lm:1", "lm:2"]
    for bad in ("lm:3", "enc:-3", "vision:0", "lm:x", "", "last"):
        with pytest.raises(ConfigError):
            parse_layers(bad, counts)


def test_feature_width_follows_layer_selection(tiny_model, image_folder):
    """Tiny LM: hidden 32, 2 layers -> 3 states; tiny encoder: width 32, depth 1 -> 2 states."""
    split = load_split(image_folder)
    counts = layer_counts(tiny_model)
    assert counts == {"lm": 3, "enc": 2}
    widths = {"lm": 96, "lm:-1": 32, "encoder": 64, "all": 160, "lm:0,enc:1": 64}
    for spec, width in widths.items():
        layers = parse_layers(spec, counts)
        assert feature_dim(tiny_model, layers) == width
        assert extract_features(tiny_model, split, layers, batch_size=5).shape == (len(split), width)


def test_lm_features_are_mean_pooled_hidden_states(tiny_model, image_folder):
    split = load_split(image_folder)
    features = extract_features(tiny_model, split, ["lm:2", "lm:0"], batch_size=4)
    images = torch.stack([load_image(p, tiny_model.config.image_size) for p in split.paths])
    with torch.no_grad():
        states = tiny_model.lm_hidden_states(tiny_model.encode(images))
    expected = torch.cat([states[2].mean(dim=1), states[0].mean(dim=1)], dim=1)
    assert torch.allclose(features, expected, atol=1e-5)


def test_token_dataset_gives_the_same_features_without_images(tiny_checkpoint, image_folder, tmp_path):
    model = load_model(tiny_checkpoint)
    tokens_file = tmp_path / "tokens.safetensors"
    write_token_dataset(tokens_file, encode_folder(model, scan_image_folder(image_folder)))
    layers = ["lm:0", "lm:1", "lm:2"]
    from_images = extract_features(model, load_split(image_folder), layers)
    shutil.rmtree(image_folder)  # proves no image is re-encoded
    tokens = load_split(tokens_file)
    assert tokens.kind == "tokens" and tokens.classes == ["blue", "red"]
    assert torch.allclose(extract_features(model, tokens, layers), from_images, atol=1e-5)


# -- head ------------------------------------------------------------------------------------------
def test_head_training_is_deterministic_under_seed():
    generator = torch.Generator().manual_seed(1)
    features, labels = torch.randn(40, 12, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    torch.manual_seed(123)
    first = train_head(features, labels, 3, ProbeConfig(epochs=5, batch_size=16, seed=7))
    torch.manual_seed(456)  # the global RNG state must not matter
    second = train_head(features, labels, 3, ProbeConfig(epochs=5, batch_size=16, seed=7))
    other = train_head(features, labels, 3, ProbeConfig(epochs=5, batch_size=16, seed=8))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.linear.weight, other.linear.weight)


def test_top5_and_per_class_with_more_than_five_classes(tiny_model, tmp_path):
    classes = ("red", "blue", "green", "gray", "c4", "c5")
    train = write_class_images(tmp_path / "train", classes=classes, per_class=3, size=16)
    val = write_class_images(tmp_path / "val", classes=classes, per_class=2, size=16, seed=3)
    report, head = run_probe(tiny_model, train, val, ProbeConfig(baselines=(), epochs=10))
    assert report.probe.top5 is not None and report.probe.top5 >= report.probe.top1
    assert set(report.probe.per_class) == set(classes)
    assert head.num_classes == 6 and report.baselines == {}


# -- the command -----------------------------------------------------------------------------------
def test_probe_json_has_every_figure_and_separates_colours(tiny_checkpoint, splits):
    train, val = splits
    report = probe_json(train, "--val", val, "--model", tiny_checkpoint)
    for key in (
        "top1", "top5", "train_top1", "per_class", "feature_dim", "layers", "train_size", "val_size", "class_counts",
        "majority_top1", "feature_seconds", "feature_seconds_per_1000", "baselines", "classes", "inputs", "config",
    ):
        assert key in report, key
    assert report["layers"] == ["lm:0", "lm:1", "lm:2"] and report["feature_dim"] == 96
    assert report["train_size"] == 24 and report["val_size"] == 30
    assert report["class_counts"] == {"train": dict.fromkeys(sorted(COLOURS), 8), "val": dict.fromkeys(sorted(COLOURS), 10)}
    assert report["top5"] is None  # 3 classes
    assert set(report["per_class"]) == set(COLOURS)
    assert report["inputs"] == {"train": "images", "val": "images"}
    assert set(report["baselines"]) == {"pixels", "random-encoder"}
    pixels, random_encoder = report["baselines"]["pixels"], report["baselines"]["random-encoder"]
    assert set(pixels) == {"feature_dim", "train_top1", "top1", "top5", "per_class", "feature_seconds", "head_seconds"}
    assert pixels["feature_dim"] == 3 * 16 * 16 and random_encoder["feature_dim"] == 96
    assert pixels["top1"] >= 0.85 and pixels["train_top1"] == 1.0  # only grayscale files can be missed
    assert report["top1"] >= 0.85 and report["train_top1"] >= 0.9
    assert random_encoder["top1"] > report["majority_top1"] + 0.3
    assert report["feature_seconds"] > 0 and report["feature_seconds_per_1000"] > 0


def test_probe_with_encoder_layers_and_one_baseline(tiny_checkpoint, splits):
    train, val = splits
    report = probe_json(train, "--val", val, "--model", tiny_checkpoint, "--layers", "lm:-1,enc:1", "--baseline", "pixels")
    assert report["layers"] == ["lm:2", "enc:1"] and report["feature_dim"] == 64
    assert list(report["baselines"]) == ["pixels"]
    assert report["top1"] >= 0.85


def test_human_output_is_a_table_on_stdout(tiny_checkpoint, splits):
    train, val = splits
    result = invoke(train, "--val", val, "--model", tiny_checkpoint, "--epochs", "5", "--baseline", "pixels", "-q")
    assert result.exit_code == 0, result.stderr
    for fragment in ("probe", "pixels", "val top-1", "red", "per 1000 images"):
        assert fragment in result.stdout


def test_token_datasets_as_inputs(tiny_checkpoint, splits, tmp_path):
    model = load_model(tiny_checkpoint)
    files = []
    for folder in splits:
        files.append(tmp_path / f"{folder.name}.safetensors")
        write_token_dataset(files[-1], encode_folder(model, scan_image_folder(folder)))
    from_tokens = probe_json(files[0], "--val", files[1], "--model", tiny_checkpoint, "--baseline", "none")
    from_images = probe_json(splits[0], "--val", splits[1], "--model", tiny_checkpoint, "--baseline", "none")
    assert from_tokens["inputs"] == {"train": "tokens", "val": "tokens"}
    assert from_tokens["top1"] == from_images["top1"] and from_tokens["per_class"] == from_images["per_class"]
    # the pixels baseline reads the images the dataset was encoded from while they exist
    assert probe_json(files[0], "--val", splits[1], "--model", tiny_checkpoint, "--baseline", "pixels")["top1"] >= 0.85

    assert_clean_error(
        invoke(files[0], "--val", files[1], "--model", tiny_checkpoint, "--layers", "all", "--baseline", "none"),
        "encoder layers need the images",
    )
    shutil.rmtree(splits[0])
    assert_clean_error(invoke(files[0], "--val", files[1], "--model", tiny_checkpoint, "--baseline", "pixels"), "--baseline none")


def test_save_then_apply_classifies_new_images(tiny_checkpoint, splits, tmp_path):
    train, val = splits
    saved = tmp_path / "probe"
    report = probe_json(train, "--val", val, "--model", tiny_checkpoint, "--baseline", "none", "--save", saved)
    meta = json.loads((saved / "probe.json").read_text())
    assert meta["layers"] == report["layers"] and meta["classes"] == sorted(COLOURS) and meta["feature_dim"] == 96
    assert Path(meta["model"]) == tiny_checkpoint.resolve() and meta["model_config"]["image_size"] == 16
    loaded = load_probe(saved)
    assert loaded.head.linear.weight.shape == (3, 96)

    one = sorted((val / "green").glob("*.png"))[2]
    result = invoke("--apply", saved, "--model", tiny_checkpoint, one, "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() in COLOURS and "\t" not in result.stdout

    result = invoke("--apply", saved, val, "-q")  # --model defaults to the checkpoint recorded in probe.json
    assert result.exit_code == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == report["val_size"] and all(label in COLOURS for _, label in rows)
    correct = sum(Path(path).parent.name == label for path, label in rows)
    assert correct / len(rows) == pytest.approx(report["top1"])  # same features, same head as the report

    odd = val / "green" / "odd\tname.png"
    odd.write_bytes(one.read_bytes())
    assert_clean_error(invoke("--apply", saved, val, "-q"), "tab, line break", "--json")
    assert str(odd) in [p["path"] for p in json.loads(invoke("--apply", saved, val, "-q", "--json").stdout)]


def test_apply_rejects_a_model_with_other_features(tiny_checkpoint, splits, tmp_path, tiny_lm_dir):
    train, val = splits
    saved = tmp_path / "probe"
    probe_json(train, "--val", val, "--model", tiny_checkpoint, "--baseline", "none", "--layers", "all", "--save", saved)
    other = tmp_path / "other"
    save_checkpoint(other, LQAE(tiny_model_config(tiny_lm_dir, encoder_width=64)), tiny_train_config())
    image = next((val / "red").glob("*.png"))
    assert_clean_error(invoke("--apply", saved, "--model", other, image), "features", str(tiny_checkpoint.resolve()))
    assert_clean_error(invoke("--apply", tmp_path / "nowhere", "--model", other, image), "not a probe folder")


# -- bad inputs ------------------------------------------------------------------------------------
def test_bad_class_folders_give_clear_errors(tiny_checkpoint, splits, tmp_path):
    train, val = splits
    mismatched = write_class_images(tmp_path / "mismatched", classes=("red", "blue", "gray"), per_class=2)
    assert_clean_error(invoke(train, "--val", mismatched, "--model", tiny_checkpoint), "missing in VAL: green", "only in VAL: gray")

    single = write_class_images(tmp_path / "single", classes=("red",), per_class=3)
    assert_clean_error(invoke(single, "--val", val, "--model", tiny_checkpoint), "single class")

    (train / "purple").mkdir()
    assert_clean_error(invoke(train, "--val", val, "--model", tiny_checkpoint), "'purple'", "no images")
    (train / "purple").rmdir()

    flat = tmp_path / "flat"
    flat.mkdir()
    for path in list((val / "red").glob("*.png"))[:2]:
        shutil.copy(path, flat / path.name)
    assert_clean_error(invoke(flat, "--val", val, "--model", tiny_checkpoint), "no classes", "sub-folder per class")


def test_bad_options_give_clear_errors(tiny_checkpoint, splits, tmp_path):
    train, val = splits
    assert_clean_error(invoke(train, "--model", tiny_checkpoint), "--val is required")
    assert_clean_error(invoke(train, "--val", val, "--model", tiny_checkpoint, "--layers", "lm:7"), "out of range", "lm:0..lm:2")
    assert_clean_error(invoke(train, "--val", val, "--model", tiny_checkpoint, "--layers", "pixels"), "unknown layer selector")
    assert_clean_error(invoke(train, "--val", tmp_path / "missing", "--model", tiny_checkpoint), "does not exist")
    assert_clean_error(invoke(train, "--val", val, "--model", tmp_path / "norun"), "does not exist")
    not_tokens = tmp_path / "notes.txt"
    not_tokens.write_text("hello")
    assert_clean_error(invoke(not_tokens, "--val", val, "--model", tiny_checkpoint), "neither images (a folder or tar shards) nor a token dataset")


def test_library_errors_are_typed(tiny_model, splits, tmp_path):
    train, val = splits
    with pytest.raises(ConfigError):
        ProbeConfig(baselines=("imagenet",))
    single = write_class_images(tmp_path / "single", classes=("red",), per_class=2)
    with pytest.raises(DataError):
        run_probe(tiny_model, train, single, ProbeConfig(baselines=()))
