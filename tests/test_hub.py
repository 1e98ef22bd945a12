"""Released weights by name: flags inferred from released file names, hub references, and `argen sample`
on released names through huggingface_hub's own cache, online against a loopback stand-in for the Hub
(whose first transfer of each file breaks off half way, so the download must resume) and then offline
with HF_HUB_OFFLINE=1.

The files hold random weights in the released layout (`{"model": state_dict, "args": Namespace}`).
GPT-B and VQ-16 are far too big to sample on a CPU in a test, so inside these tests the registry
entries "GPT-B" and "VQ-16" stand for GPT-tiny (with 1000 classes) and VQ-tiny-16; the name logic,
the layout and the hub path are the real ones.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from argen.checkpoint import load_gpt, load_tokenizer
from argen.checkpoint.hub import (
    default_tokenizer,
    gpt_class_names,
    model_id,
    parse_hub_ref,
    released_gpt_flags,
    resolve,
)
from argen.checkpoint.released import RELEASED_REPOS, imagenet_class_names, read_torch_file, released_name
from argen.cli.main import main
from argen.models.gpt import GPT, GPT_CONFIGS
from argen.models.tokenizer import VQ_CONFIGS, VQModel
from argen.utils.errors import ArgenError
from conftest import randomize

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMALL_GPT = replace(GPT_CONFIGS["GPT-tiny"], num_classes=1000, name="GPT-B")
SMALL_VQ = replace(VQ_CONFIGS["VQ-tiny-16"], name="VQ-16")
# the registry swap for a separate `argen` process, then the CLI itself
PATCHED_MAIN = ("import sys; from dataclasses import replace; from argen.models.gpt import GPT_CONFIGS; "
                "from argen.models.tokenizer import VQ_CONFIGS; "
                "GPT_CONFIGS['GPT-B'] = replace(GPT_CONFIGS['GPT-tiny'], num_classes=1000, name='GPT-B'); "
                "VQ_CONFIGS['VQ-16'] = replace(VQ_CONFIGS['VQ-tiny-16'], name='VQ-16'); "
                "from argen.cli.main import main; sys.exit(main(sys.argv[1:]))")


# ------------------------------------------------------------------------- names
@pytest.mark.parametrize("name, expected", [
    ("c2i_B_256", ("GPT-B", "c2i", 256, 16, "vq_ds16_c2i")),
    ("c2i_L_384", ("GPT-L", "c2i", 384, 16, "vq_ds16_c2i")),
    ("c2i_3B_384", ("GPT-3B", "c2i", 384, 16, "vq_ds16_c2i")),
    ("t2i_XL_stage1_256", ("GPT-XL", "t2i", 256, 16, "vq_ds16_t2i")),
    ("t2i_XL_stage2_512", ("GPT-XL", "t2i", 512, 16, "vq_ds16_t2i")),
    ("hf://FoundationVision/LlamaGen/c2i_XXL_384.pt", ("GPT-XXL", "c2i", 384, 16, "vq_ds16_c2i")),
    ("/models/c2i_XL_384.pt", ("GPT-XL", "c2i", 384, 16, "vq_ds16_c2i")),
])
def test_generator_flags_come_from_the_released_name(name, expected):
    info = released_name(name)
    assert (info.config, info.kind, info.image_size, info.downsample, info.tokenizer) == expected
    assert released_gpt_flags(name) == expected[:4]
    assert info.config in GPT_CONFIGS


def test_tokenizer_names_every_released_file_and_other_names():
    assert (released_name("vq_ds16_c2i").config, released_name("vq_ds8_c2i.pt").config) == ("VQ-16", "VQ-8")
    assert released_name("vq_ds16_t2i").family == "vq" and released_name("runs/demo/gpt") is None
    assert released_name("gpt.safetensors") is None and released_name("c2i_B_256.safetensors") is None
    for name, repo in RELEASED_REPOS.items():  # every published file parses, in the repository that holds it
        assert released_name(name) is not None
        assert repo == ("peizesun/llamagen_t2i" if name.endswith("t2i") or name.startswith("t2i") else
                        "FoundationVision/LlamaGen")
    assert default_tokenizer("c2i_L_384") == "vq_ds16_c2i"
    assert default_tokenizer("hf://FoundationVision/LlamaGen@v1/c2i_L_384.pt") == \
        "hf://FoundationVision/LlamaGen@v1/vq_ds16_c2i.pt"
    assert default_tokenizer("runs/demo/gpt-c2i") is None
    assert model_id("c2i_B_256") == "c2i_B_256" and model_id("runs/demo/gpt-c2i/") == "gpt-c2i"
    assert model_id("runs/x/gpt.safetensors") == "x"


def test_hub_references_parse_and_bad_ones_are_refused():
    assert parse_hub_ref("hf://FoundationVision/LlamaGen/c2i_L_384.pt") == ("FoundationVision/LlamaGen",
                                                                             "c2i_L_384.pt", None)
    assert parse_hub_ref("hf://me/repo@abc/sub/dir/w.pt") == ("me/repo", "sub/dir/w.pt", "abc")
    assert parse_hub_ref("hf://me/repo") == ("me/repo", None, None)  # a whole repository written by argen push
    assert parse_hub_ref("hf://me/repo@v1/") == ("me/repo", None, "v1")
    for bad in ("hf://FoundationVision", "hf://me/@v1", "hf://me//w.pt"):
        with pytest.raises(ArgenError, match="hf://owner/repo/file"):
            parse_hub_ref(bad)


def test_explicit_flags_win_where_the_weights_allow_and_contradictions_fail_loudly():
    assert released_gpt_flags("c2i_L_384", "GPT-L", "c2i", 256) == ("GPT-L", "c2i", 256, 16)  # another size
    with pytest.raises(ArgenError, match=r"--gpt-config GPT-B contradicts c2i_L_384.*GPT-L"):
        released_gpt_flags("c2i_L_384", config="GPT-B")
    with pytest.raises(ArgenError, match=r"--kind t2i contradicts"):
        released_gpt_flags("c2i_L_384", kind="t2i")
    with pytest.raises(ArgenError, match=r"--downsample 8 contradicts"):
        released_gpt_flags("c2i_L_384", downsample=8)
    with pytest.raises(ArgenError, match="is a tokenizer"):
        released_gpt_flags("vq_ds16_c2i")


def test_contradicting_flag_on_the_command_line_fails_before_any_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("argen.checkpoint.hub._download", lambda *a: pytest.fail("downloaded"))
    code = main(["sample", "--gpt", "c2i_B_256", "--gpt-config", "GPT-L", "--classes", "1", "--device", "cpu",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--gpt-config GPT-L contradicts c2i_B_256" in err and "\n" not in err.strip()


def test_a_local_file_with_a_released_name_needs_no_flags(tmp_path, monkeypatch):
    monkeypatch.setitem(GPT_CONFIGS, "GPT-B", SMALL_GPT)
    gpt = randomize(GPT(SMALL_GPT))
    torch.save({"model": gpt.state_dict()}, tmp_path / "c2i_B_256.pt")
    loaded = load_gpt(tmp_path / "c2i_B_256.pt")
    assert loaded.config.image_size == 256 and loaded.config.kind == "c2i" and loaded.config.num_classes == 1000
    assert torch.equal(loaded.output.weight, gpt.output.weight)
    assert gpt_class_names(tmp_path / "c2i_B_256.pt", 1000) == list(imagenet_class_names())
    assert default_tokenizer(tmp_path / "c2i_B_256.pt") == "vq_ds16_c2i"  # not beside it: the released name
    (tmp_path / "vq_ds16_c2i.pt").write_bytes(b"")
    assert default_tokenizer(tmp_path / "c2i_B_256.pt") == str(tmp_path / "vq_ds16_c2i.pt")


def test_imagenet_names_file():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[207] == "golden retriever" and names[999] == "toilet tissue"


# ------------------------------------------------------------------------- a loopback Hub
def released_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(image_size=256)}, buffer)
    return buffer.getvalue()


class FakeHub:
    """Serves `/{repo}/resolve/{revision}/{file}` as the Hub does (HEAD with commit, ETag and size; GET with
    Range). The first GET of each file sends half of it and drops the connection.

    It also takes what `HfApi.create_repo`, `create_branch` and `upload_folder` send (huggingface_hub's own
    requests, answered as the Hub's API does): repository creation (409 when it exists), README metadata
    validation, preupload (every file "regular", so the contents come base64-encoded in the commit) and the
    NDJSON commit, whose files are then served on the branch it names under a new commit id. A request
    without a bearer token (or with one in `refused`) is refused with 401. `commits` records (repo, revision,
    message, {path: bytes}, token) of each commit; `created` the create_repo payloads."""

    def __init__(self, files: dict[tuple[str, str], bytes]):
        self.files, self.requests, self.cut = files, [], set()
        self.branches: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, branch) -> files, other than main
        self.heads: dict[tuple[str, str], str] = {}  # (repo, revision) -> commit id, once something was committed
        self.repos: set[str] = {repo for repo, _ in files}
        self.commits, self.created, self.refused = [], [], set()  # refused: tokens answered with 401
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _file(self):
                match = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", self.path)
                data = None
                if match:
                    repo, revision, name = match.groups()
                    self.commit = hub.heads.get((repo, revision), COMMIT)
                    branch = hub.branches.get((repo, revision))
                    data = branch.get(name) if branch is not None else hub.files.get((repo, name))
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                return data

            def _headers(self, data: bytes, status: int = 200, start: int = 0):
                self.send_response(status)
                self.send_header("X-Repo-Commit", getattr(self, "commit", COMMIT))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, None))
                data = self._file()
                if data is not None:
                    self._headers(data)

            def do_GET(self):
                ranged = self.headers.get("Range")
                hub.requests.append(("GET", self.path, ranged))
                data = self._file()
                if data is None:
                    return
                start = int(re.match(r"bytes=(\d+)-", ranged).group(1)) if ranged else 0
                self._headers(data, 206 if start else 200, start)
                if self.path not in hub.cut:  # the first transfer breaks off half way
                    hub.cut.add(self.path)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def _json(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                hub.requests.append(("POST", self.path, token))
                if not token or token in hub.refused:
                    return self._json(401, {"error": "Invalid credentials in Authorization header"})
                if self.path == "/api/validate-yaml":
                    return self._json(200, {})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    repo = f"{payload['organization']}/{payload['name']}"
                    if repo in hub.repos:
                        return self._json(409, {"error": "You already created this model repo"})
                    hub.repos.add(repo)
                    return self._json(200, {"url": f"{hub.url}/{repo}"})
                match = re.fullmatch(r"/api/models/(.+?/.+?)/(preupload|commit|branch)/([^?]+)(\?.*)?", self.path)
                if match is None or match.group(1) not in hub.repos:
                    return self._json(404, {"error": "Repository not found"})
                repo, action, revision = match.group(1), match.group(2), unquote(match.group(3))
                if action == "branch":
                    hub.branches.setdefault((repo, revision), {
                        name: data for (r, name), data in hub.files.items() if r == repo})
                    return self._json(200, {})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                added = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                commit = hashlib.sha1(body).hexdigest()
                if revision == "main":
                    hub.files.update({(repo, name): data for name, data in added.items()})
                elif (repo, revision) in hub.branches:
                    hub.branches[(repo, revision)].update(added)
                else:
                    return self._json(404, {"error": f"Invalid rev id: {revision}"})
                hub.heads[(repo, revision)] = commit
                hub.commits.append((repo, revision, header["summary"], added, token))
                return self._json(200, {"commitUrl": f"{hub.url}/{repo}/commit/{commit}", "commitOid": commit,
                                        "pullRequestUrl": None})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def point_at(server: FakeHub, cache: Path, monkeypatch) -> Path:
    """huggingface_hub's endpoint, download URLs and cache -> `server` and `cache`, online, without Xet."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # (10 MB) so the part before the break is kept
    return cache


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback Hub with c2i_B_256.pt and vq_ds16_c2i.pt, and huggingface_hub pointed at it and at an
    empty cache under tmp_path."""
    torch.manual_seed(0)
    gpt = randomize(GPT(SMALL_GPT), seed=1)
    vq = VQModel(SMALL_VQ).eval()
    server = FakeHub({("FoundationVision/LlamaGen", "c2i_B_256.pt"): released_bytes(gpt),
                      ("FoundationVision/LlamaGen", "vq_ds16_c2i.pt"): released_bytes(vq)})
    cache = point_at(server, tmp_path / "hf" / "hub", monkeypatch)
    monkeypatch.setitem(GPT_CONFIGS, "GPT-B", SMALL_GPT)
    monkeypatch.setitem(VQ_CONFIGS, "VQ-16", SMALL_VQ)
    monkeypatch.setattr("time.sleep", lambda s: None)  # huggingface_hub waits 1 s before it resumes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 256 tokens of a tiny model: threads only add overhead on a shared CPU
    yield server, cache, gpt
    torch.set_num_threads(threads)
    server.close()


def run_offline(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    """`argen ARGS` in a fresh process with HF_HUB_OFFLINE=1 and the Hub pointed at a closed port."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", PATCHED_MAIN, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_sample_by_released_name_downloads_resumes_then_works_offline(hub, tmp_path):
    server, cache, gpt = hub
    out = tmp_path / "online"
    code = main(["sample", "--gpt", "c2i_B_256", "--classes", "207", "--device", "cpu", "--top-k", "10",
                 "--out", str(out), "--no-progress"])  # the complete command: the tokenizer comes from the name
    assert code == 0
    online = np.array(Image.open(out / "00000_class207.png"))
    assert online.shape == (256, 256, 3)
    gets = [(path, ranged) for method, path, ranged in server.requests if method == "GET"]
    for file in ("c2i_B_256.pt", "vq_ds16_c2i.pt"):  # each transfer broke off and was resumed with a Range
        ranges = [ranged for path, ranged in gets if path.endswith(file)]
        assert ranges[0] is None and len(ranges) == 2 and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    snapshot = cache / "models--FoundationVision--LlamaGen" / "snapshots" / COMMIT
    assert (cache / "models--FoundationVision--LlamaGen" / "refs" / "main").read_text() == COMMIT
    assert torch.equal(read_torch_file(snapshot / "c2i_B_256.pt")["model"]["output.weight"], gpt.output.weight)
    assert resolve("c2i_B_256")[0].resolve() == (snapshot / "c2i_B_256.pt").resolve()
    loaded = load_gpt("c2i_B_256")  # the Python API takes the names too, flags from the name
    assert (loaded.config.image_size, loaded.config.num_classes) == (256, 1000)
    assert torch.equal(loaded.output.weight, gpt.output.weight)
    assert load_tokenizer("vq_ds16_c2i").downsample == 16

    server.close()  # the network is gone; the cache and HF_HUB_OFFLINE=1 are enough
    offline = run_offline(["sample", "--gpt", "hf://FoundationVision/LlamaGen/c2i_B_256.pt",
                           "--tokenizer", "vq_ds16_c2i", "--classes", "207", "--device", "cpu", "--top-k", "10",
                           "--out", str(tmp_path / "offline"), "--no-progress"], cache.parent)
    assert offline.returncode == 0, offline.stderr
    assert np.array_equal(np.array(Image.open(tmp_path / "offline" / "00000_class207.png")), online)


def test_offline_without_the_file_in_the_cache_says_so(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code = main(["sample", "--gpt", "c2i_L_384", "--classes", "1", "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "hf://FoundationVision/LlamaGen/vq_ds16_c2i.pt is not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE" in err and not hub[0].requests  # nothing was asked of the Hub


def test_hub_errors_are_one_line(hub, tmp_path, capsys, monkeypatch):
    import logging

    # huggingface_hub's own handler may hold the stderr of an earlier test; point it at this one's. Its
    # "Trying to resume download..." warnings for the (deliberately broken) tokenizer transfer may show.
    for handler in logging.getLogger("huggingface_hub").handlers:
        if isinstance(handler, logging.StreamHandler):
            monkeypatch.setattr(handler, "stream", sys.stderr)
    code = main(["sample", "--gpt", "hf://FoundationVision/LlamaGen/c2i_B_999.pt", "--tokenizer", "vq_ds16_c2i",
                 "--gpt-config", "GPT-B", "--kind", "c2i", "--classes", "1", "--device", "cpu",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("argen sample: error:")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and "c2i_B_999.pt" in errors[0] and err.endswith(errors[0])


def test_sample_batch_by_released_name_records_the_hub_files(hub, tmp_path):
    code = main(["sample-batch", "--gpt", "c2i_B_256", "--image-size", "64", "--device", "cpu", "--num-samples", "2",
                 "--num-classes", "1000", "--batch-size", "2", "--out", str(tmp_path / "batch"), "--no-progress"])
    assert code == 0
    config = json.loads((tmp_path / "batch" / "config.json").read_text())
    assert config["checkpoints"]["gpt"] == "hf://FoundationVision/LlamaGen/c2i_B_256.pt"
    assert config["checkpoints"]["tokenizer"] == "hf://FoundationVision/LlamaGen/vq_ds16_c2i.pt"
    assert np.load(tmp_path / "batch" / "samples.npz")["arr_0"].shape == (2, 64, 64, 3)  # --image-size wins


def test_tokenizer_may_be_left_out_only_for_a_released_generator(tmp_path, capsys):
    (tmp_path / "my-run").mkdir()  # an argen run folder, not a released name
    code = main(["sample", "--gpt", str(tmp_path / "my-run"), "--classes", "1", "--device", "cpu",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--tokenizer is required" in err and "c2i_B_256" in err
