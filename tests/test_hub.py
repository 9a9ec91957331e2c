"""Sharing on the Hugging Face hub: load by id from the hub cache (offline, through huggingface_hub),
the model card, and `lqae push` against a loopback stub of the hub's HTTP API."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_GLOBAL_SETS, save_tiny_checkpoint, write_class_images
from lqae.run_folder import short

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cli(*args, env=None, cwd=None):
    full = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lqae_cli", *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=300)


def hub_cache_with(run: Path, cache: Path, repo: str = "org/tiny-lqae", ref: str = "main") -> Path:
    """A hub cache as huggingface_hub lays it out, holding `run`'s inference files at `ref`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run / name, snapshot / name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(COMMIT)
    return cache


def test_load_by_hub_id_from_the_cache_offline(tiny_lm_dir, tmp_path, image_folder):
    run = save_tiny_checkpoint(tiny_lm_dir, tmp_path / "run", seed=0)
    cache = hub_cache_with(run, tmp_path / "hub")
    hub_cache_with(run, cache, ref="v1")
    image = next((image_folder / "red").glob("*.png"))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    local = cli("encode", image, "-m", run, "-f", "ids")
    assert local.returncode == 0, local.stderr
    for model in ("org/tiny-lqae", "org/tiny-lqae@v1"):
        by_id = cli("encode", image, "-m", model, "-f", "ids", env=env)
        assert by_id.returncode == 0, by_id.stderr
        assert by_id.stdout == local.stdout
    from_env = cli("encode", image, "-f", "ids", env={**env, "LQAE_MODEL": "org/tiny-lqae"})
    assert from_env.stdout == local.stdout
    missing = cli("encode", image, "-m", "org/no-such-model", env=env)
    assert missing.returncode == 1 and missing.stdout == ""
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint org/no-such-model is not a local folder")
    assert "Traceback" not in missing.stderr


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(tiny_lm_dir, tmp_path, image_folder):
    hub_run = save_tiny_checkpoint(tiny_lm_dir, tmp_path / "hub_run", seed=0)
    cache = hub_cache_with(hub_run, tmp_path / "hub")
    save_tiny_checkpoint(tiny_lm_dir, tmp_path / "work" / "org" / "tiny-lqae", seed=5)  # ./org/tiny-lqae
    image = next((image_folder / "red").glob("*.png"))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    local = cli("encode", image, "-m", "org/tiny-lqae", "-f", "ids", env=env, cwd=tmp_path / "work")
    hub = cli("encode", image, "-m", "org/tiny-lqae", "-f", "ids", env=env, cwd=tmp_path)
    assert local.returncode == hub.returncode == 0, local.stderr + hub.stderr
    reference = cli("encode", image, "-m", tmp_path / "work" / "org" / "tiny-lqae", "-f", "ids")
    assert local.stdout == reference.stdout != hub.stdout


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def trained_once(tiny_lm_dir, tmp_path_factory) -> Path:
    images = write_class_images(tmp_path_factory.mktemp("hub_images") / "images")
    run = tmp_path_factory.mktemp("hub_run") / "run"
    result = cli("train", images, "--out", run, "--lm", tiny_lm_dir, "--image-size", "16", "--patch-size", "4",
                 "--batch-size", "4", "--steps", "2", "--quiet", "--workers", "0", "--val", images, *SMALL_GLOBAL_SETS)
    assert result.returncode == 0, result.stderr
    return run


def trained_run(trained_once, tmp_path) -> Path:
    """A private copy of a 2-step run (with metrics, samples and data.json) that a test may change."""
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def test_the_card_has_valid_metadata_and_the_runs_figures(tiny_lm_dir, trained_once, tmp_path):
    run = trained_run(trained_once, tmp_path)
    written = cli("card", run, "--repo", "me/tiny")
    assert written.returncode == 0, written.stderr
    card = (run / "README.md").read_text()
    assert written.stdout.strip() == str(run / "README.md")
    meta = front_matter(card)
    assert meta["library_name"] == "lqae" and meta["base_model"] == str(tiny_lm_dir)
    assert meta["license"] == "apache-2.0" and "lqae" in meta["tags"]
    assert "lqae encode image.png -m me/tiny" in card
    assert "`images` (12 images, 2 classes)" in card and "steps: 2 at batch 4" in card
    assert "| PSNR (dB) |" in card and "`samples/step_0000002.png`" in card
    inline = card.split("![samples](data:image/png;base64,")[1].split(")")[0]
    assert base64.b64decode(inline) == (run / "samples" / "step_0000002.png").read_bytes()  # the card carries the grid


class HubStub:
    """The hub endpoints `lqae push` uses, on 127.0.0.1: repo creation, YAML validation, pre-upload,
    branch creation and the NDJSON commit (whose files it decodes)."""

    def __init__(self) -> None:
        self.created, self.branches, self.commits, self.yaml = [], [], [], []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(404, {"error": "not here"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/api/repos/create":
                    stub.created.append(json.loads(body))
                    return self._send(200, {"url": f"{stub.url}/org/name"})
                if self.path == "/api/validate-yaml":
                    stub.yaml.append(json.loads(body)["content"])
                    return self._send(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files]})
                if "/branch/" in self.path:
                    stub.branches.append(self.path)
                    return self._send(200, {})
                if "/commit/" in self.path:
                    files = {}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    stub.commits.append((self.path, files))
                    return self._send(200, {"commitUrl": f"{stub.url}/org/name/commit/{COMMIT}", "commitOid": COMMIT})
                self._send(404, {"error": f"no {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def hub_stub():
    stub = HubStub()
    yield stub
    stub.close()


def test_push_sends_exactly_the_checkpoint_and_its_card(trained_once, tmp_path, hub_stub):
    run = trained_run(trained_once, tmp_path)
    env = {"HF_ENDPOINT": hub_stub.url, "HF_TOKEN": "hf_test_token", "HF_HUB_OFFLINE": "0"}
    result = cli("push", run, "org/name", "--private", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"/commit/{COMMIT}")
    assert hub_stub.created[0]["name"] == "name" and hub_stub.created[0]["organization"] == "org"
    assert hub_stub.created[0].get("visibility") == "private" or hub_stub.created[0].get("private") is True
    (path, files), = hub_stub.commits
    assert path.endswith("/commit/main")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]  # never train_state
    assert files["config.json"] == (run / "config.json").read_bytes()
    assert files["model.safetensors"] == (run / "model.safetensors").read_bytes()
    assert front_matter(files["README.md"].decode())["library_name"] == "lqae"
    assert "lqae encode image.png -m org/name" in files["README.md"].decode()


def test_push_uses_the_card_you_edited_and_a_branch(trained_once, tmp_path, hub_stub):
    run = trained_run(trained_once, tmp_path)
    assert cli("card", run).returncode == 0
    (run / "README.md").write_text((run / "README.md").read_text() + "\nEdited by hand.\n")
    result = cli("push", run, "org/name", "--revision", "v2", env={"HF_ENDPOINT": hub_stub.url, "HF_TOKEN": "t", "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 0, result.stderr
    (path, files), = hub_stub.commits
    assert path.endswith("/commit/v2") and hub_stub.branches
    assert files["README.md"].decode().endswith("Edited by hand.\n")


def test_push_errors_are_one_line(tiny_lm_dir, image_folder, tmp_path):
    run = save_tiny_checkpoint(tiny_lm_dir, tmp_path / "run", seed=0)
    bad_id = cli("push", run, "not-an-id")
    assert bad_id.returncode == 1 and bad_id.stderr.strip().splitlines()[-1].startswith("error: 'not-an-id' is not a hub")
    with __import__("socket").socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = cli("push", run, "org/name", env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "t", "HF_HUB_OFFLINE": "0"})
    lines = down.stderr.strip().splitlines()
    assert down.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: cannot push to org/name")
    assert "Traceback" not in down.stderr


def test_a_long_hub_error_is_cut_at_a_word_and_never_inside_a_quoted_name():
    long = Exception("Repo id must be in the form 'repo_name' or 'namespace/repo_name': '" + "x " * 100 + "'. More text.")
    cut = short(long)
    assert cut == "Repo id must be in the form 'repo_name' or 'namespace/repo_name': ..." and len(cut) <= 204
    assert short(Exception("Not found.\n\n  Details: a page of HTML")) == "Not found."  # the first sentence


def test_push_uploads_only_a_card_lqae_wrote(trained_once, tmp_path, hub_stub):
    run = trained_run(trained_once, tmp_path)
    (run / "README.md").write_text("# my private notes\n")
    result = cli("push", run, "org/name", env={"HF_ENDPOINT": hub_stub.url, "HF_TOKEN": "t", "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 0, result.stderr
    (_, files), = hub_stub.commits
    assert b"my private notes" not in files["README.md"]
    assert front_matter(files["README.md"].decode())["library_name"] == "lqae"
    assert "is not a card `lqae card` wrote: pushing a fresh card instead" in result.stderr
    assert (run / "README.md").read_text() == "# my private notes\n"
