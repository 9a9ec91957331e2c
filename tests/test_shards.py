"""WebDataset-style tar shards as an image source: the same images, labels, ids and training
metrics as the same files in a folder."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_model_config, tiny_train_config
from lqae.images.files import scan_image_folder
from lqae.errors import DataError
from lqae.images.shards import is_shard_source, scan_shards, shard_files, write_shards
from lqae.images.source import scan_images
from lqae.tokendata import read_token_dataset
from lqae.training import train
from lqae_cli.app import app


def jpeg_folder(root, per_class=5, classes=("blue", "red"), size=(40, 30)):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(80 + 90 * c, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def folder_and_shards(tmp_path):
    folder = scan_image_folder(jpeg_folder(tmp_path / "images"))
    write_shards(folder, tmp_path / "shards", per_shard=4)
    return folder, tmp_path / "shards"


def test_shards_hold_the_folders_images_in_order_with_its_labels(folder_and_shards):
    folder, shards = folder_and_shards
    assert [p.name for p in shard_files(shards)] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert is_shard_source(shards) and is_shard_source(shards / "shard-000000.tar")
    assert not is_shard_source(folder.root)
    found = scan_images(shards)
    assert len(found) == len(folder) == 10 and found.labels == folder.labels and found.classes == ["0", "1"]
    for member, path in zip(found.paths, folder.paths):
        assert member.open_bytes().read() == path.read_bytes()
        assert str(member).startswith(str(shards / "shard-")) and member.suffix == ".jpg"
    braces = scan_images(shards / "shard-{000000..000002}.tar")
    assert [str(p) for p in braces.paths] == [str(p) for p in found.paths]
    assert len(scan_images(shards / "shard-000001.tar")) == 4


def shard(path, samples):
    """A tar of (member name, bytes) in order, as WebDataset writes one."""
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_cls_names_or_no_labels_and_bad_shards(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    png = buffer.getvalue()
    named = scan_shards(shard(tmp_path / "named.tar", [
        ("a/x1.png", png), ("a/x1.cls", b"zebra\n"), ("a/x2.seg.png", png), ("x3.png", png), ("x3.cls", b"ant"),
        ("a/x2.seg.png.cls", b"?"), ("a/x2.cls", b"zebra"), ("notes.txt", b"no image"),
    ]))
    # a/x2's fields are "seg.png" and "seg.png.cls" (the key ends at the first dot): no image, no label
    assert named.classes == ["ant", "zebra"] and named.labels == [1, 0]
    assert [m.name for m in named.paths] == ["a/x1.png", "x3.png"]
    flat = scan_shards(shard(tmp_path / "flat.tar", [("k1.png", png), ("k2.png", png), ("k3.png", b"broken")]))
    assert flat.classes == [] and flat.labels == [-1, -1] and [str(m).split("/")[-1] for m in flat.skipped] == ["k3.png"]
    with pytest.raises(DataError, match="1 of 2 samples .* have no .cls label"):
        scan_shards(shard(tmp_path / "half.tar", [("k1.png", png), ("k1.cls", b"0"), ("k2.png", png)]))
    (tmp_path / "fake.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DataError, match="uncompressed .tar"):
        scan_shards(tmp_path / "fake.tar")
    with pytest.raises(DataError, match="shard-000003.tar does not exist"):
        scan_images(tmp_path / "shard-{000003..000004}.tar")
    with pytest.raises(DataError, match="no readable images"):
        scan_shards(shard(tmp_path / "empty.tar", [("readme.txt", b"hi")]))


def test_encode_reads_shards_with_the_folders_ids(folder_and_shards, tiny_checkpoint, tmp_path):
    folder, shards = folder_and_shards
    runner = CliRunner()
    for source, out in ((folder.root, "folder.safetensors"), (shards, "shards.safetensors")):
        result = runner.invoke(app, ["encode", str(source), "-m", str(tiny_checkpoint), "-o", str(tmp_path / out),
                                     "--quiet", "--workers", "0"])
        assert result.exit_code == 0, result.output
    from_folder, from_shards = read_token_dataset(tmp_path / "folder.safetensors"), read_token_dataset(tmp_path / "shards.safetensors")
    assert from_shards.ids.tolist() == from_folder.ids.tolist()
    assert from_shards.labels.tolist() == from_folder.labels.tolist()
    printed = runner.invoke(app, ["encode", str(shards), "-m", str(tiny_checkpoint), "-f", "ids", "--workers", "0"])
    assert printed.exit_code == 0, printed.output
    rows = [line.split("\t") for line in printed.stdout.splitlines()]
    assert [r[0] for r in rows] == from_shards.paths
    assert [list(map(int, r[1].split())) for r in rows] == from_folder.ids.tolist()
    reports = [runner.invoke(app, ["eval", str(source), "-m", str(tiny_checkpoint), "--json"]) for source in (folder.root, shards)]
    assert all(r.exit_code == 0 for r in reports), reports[1].output
    from_folder_report, from_shards_report = (json.loads(r.stdout) for r in reports)
    assert from_shards_report.pop("folder") == str(shards) and from_folder_report.pop("folder") == str(folder.root)
    assert from_shards_report == from_folder_report  # PSNR, SSIM, codes: the same


def test_training_on_shards_matches_training_on_the_folder(folder_and_shards, tiny_lm_dir, tmp_path):
    folder, shards = folder_and_shards
    config = dict(steps=2, batch_size=4, sample_every=100, save_every=100, val_every=2)
    runs = {}
    for name, source in (("folder", folder.root), ("shards", shards)):
        result = train(source, tmp_path / f"run_{name}", tiny_model_config(tiny_lm_dir), tiny_train_config(**config),
                       val_dir=source)
        runs[name] = result, load_file(tmp_path / f"run_{name}" / "model.safetensors")
    (a, weights_a), (b, weights_b) = runs["folder"], runs["shards"]
    assert a.last_metrics.keys() == b.last_metrics.keys()
    for key, value in a.last_metrics.items():
        if key not in ("sec_per_step", "images_per_sec"):
            assert b.last_metrics[key] == value, key
    assert a.validation == b.validation
    assert all(np.array_equal(weights_a[k].numpy(), weights_b[k].numpy()) for k in weights_a)
    record = json.loads((tmp_path / "run_shards" / "data.json").read_text())
    assert record["train"]["images"] == 10 and record["train"]["classes"] == ["0", "1"]


def test_probe_reads_shards_as_it_reads_the_folder(folder_and_shards, tiny_checkpoint):
    """One image source for every command: `probe` takes tar shards as `train`, `encode` and `eval` do."""
    folder, shards = folder_and_shards
    runner = CliRunner()
    reports = []
    for source in (folder.root, shards / "shard-{000000..000002}.tar"):
        result = runner.invoke(app, ["probe", str(source), "--val", str(source), "-m", str(tiny_checkpoint), "--json",
                                     "--epochs", "2", "--baseline", "pixels"])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    by_folder, by_shards = reports
    assert by_shards["top1"] == by_folder["top1"] and by_shards["class_counts"]["train"] == {"0": 5, "1": 5}
    assert by_shards["baselines"]["pixels"]["top1"] == by_folder["baselines"]["pixels"]["top1"]
    assert by_shards["train_size"] == by_folder["train_size"] == 10
