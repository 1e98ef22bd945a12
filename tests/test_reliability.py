"""Faults get one clear answer: numeric flag types, full disks, run-directory locks, crafted pickles,
missing paths, a busy port, a light `argen --help`, cached reference statistics, one progress rule."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from argen.cli import common
from argen.utils.errors import ArgenError
from argen.utils.io import (
    atomic_save_npy,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    disk_full_error,
    is_disk_full,
    lock_path,
    run_lock,
)

# ---------------------------------------------------------------- numeric flag types


def _parse(kind, text):
    parser = argparse.ArgumentParser(prog="argen x")
    parser.add_argument("--v", type=kind)
    return parser.parse_args(["--v", text]).v


@pytest.mark.parametrize("kind, good, bad", [
    (common.positive_int, {"1": 1, "64": 64}, ["0", "-1", "nan", "inf", "1.5", "x", ""]),
    (common.nonneg_int, {"0": 0, "7": 7}, ["-1", "nan", "inf", "2.0"]),
    (common.positive_float, {"1e-3": 1e-3, "2": 2.0}, ["0", "-1", "nan", "inf", "-inf", "1e400"]),
    (common.nonneg_float, {"0": 0.0, "3.5": 3.5}, ["-0.1", "nan", "inf"]),
    (common.finite_float, {"-2": -2.0, "0": 0.0, "1e308": 1e308}, ["nan", "inf", "-inf", "1e400", "a"]),
    (common.unit_interval, {"1": 1.0, "0.5": 0.5}, ["0", "1.01", "-1", "nan", "inf"]),
    (common.probability, {"0": 0.0, "0.99": 0.99}, ["1", "-0.1", "nan", "inf"]),
    (common.int_range(1, 65535), {"1": 1, "65535": 65535}, ["0", "65536", "nan"]),
    (common.float_range(0.0, 10.0), {"0": 0.0, "10": 10.0}, ["-1", "10.5", "nan"]),
])
def test_numeric_types_accept_their_range_and_refuse_the_rest(kind, good, bad, capsys):
    for text, value in good.items():
        assert _parse(kind, text) == value
    for text in bad:
        with pytest.raises(SystemExit) as info:
            _parse(kind, text)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "argen x: error: argument --v: " in err and "Traceback" not in err


# ---------------------------------------------------------------- progress rule


class _Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty

    def write(self, text):
        return len(text)


def test_progress_rule_flag_wins_else_terminal_decides(monkeypatch):
    parser = argparse.ArgumentParser()
    common.add_progress_argument(parser, quiet_alias=True)
    for tty in (False, True):
        monkeypatch.setattr(sys, "stderr", _Stream(tty))
        assert common.show_progress(parser.parse_args([])) is tty
        assert common.show_progress(parser.parse_args(["--progress"])) is True
        assert common.show_progress(parser.parse_args(["--no-progress"])) is False
        assert common.show_progress(parser.parse_args(["--quiet"])) is False


# ---------------------------------------------------------------- full disks


def _enospc(tmp):
    tmp.write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_full(tmp):
    tmp.write_bytes(b"partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def _stream_writer_full(tmp):
    raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")


def _safetensors_full(tmp):
    raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")


def _quota(tmp):
    raise OSError(errno.EDQUOT, "Disk quota exceeded")


@pytest.mark.parametrize("fail", [_enospc, _torch_full, _stream_writer_full, _safetensors_full, _quota])
def test_full_disk_is_one_line_old_file_intact_no_temp_file(tmp_path, fail):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with pytest.raises(ArgenError) as info:
        atomic_write(target, fail)
    message = str(info.value)
    assert "\n" not in message and str(target) in message
    assert ("no space left" in message or "quota" in message) and "free" in message
    assert "mounted at" in message and "previous file is intact" in message
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_other_errors_pass_through_unchanged(tmp_path):
    def broken(tmp):
        raise RuntimeError("a programming error")

    with pytest.raises(RuntimeError, match="a programming error"):
        atomic_write(tmp_path / "x", broken)
    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "y", lambda tmp: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    assert list(tmp_path.iterdir()) == []
    assert not is_disk_full(ValueError("unexpected value"))
    assert disk_full_error(ValueError("x"), tmp_path / "x") is None


def test_full_disk_names_the_bytes_needed_when_known(tmp_path, monkeypatch):
    real_write_bytes = Path.write_bytes

    def full(self, data):
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(ArgenError, match=r"2\.0 KiB needed; no partial file was left"):
        atomic_write_bytes(tmp_path / "b.bin", b"x" * 2048)
    with pytest.raises(ArgenError, match="needed"):
        atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def _small_filesystem(tmp_path, size="256k"):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    return mount


@pytest.fixture
def small_fs(tmp_path):
    mount = _small_filesystem(tmp_path)
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_real_full_disk_with_torch_save_safetensors_and_numpy(small_fs):
    from safetensors.torch import save_file

    old = small_fs / "state.pt"
    atomic_write(old, lambda tmp: torch.save({"step": 1}, tmp))
    big = torch.zeros(200_000)  # 800 KB, more than the 256 KiB filesystem
    writers = {
        old: lambda tmp: torch.save({"w": big}, tmp),
        small_fs / "gpt.safetensors": lambda tmp: save_file({"w": big}, str(tmp)),
    }
    for path, write in writers.items():
        with pytest.raises(ArgenError, match=f"no space left on device while writing {path}: the filesystem "
                                             f"mounted at {small_fs} has"):
            atomic_write(path, write)
    with pytest.raises(ArgenError, match=r"has 2\d\d\.\d KiB free, 1\.5 MiB needed"):  # the space is back
        atomic_save_npy(small_fs / "a.npy", np.zeros(200_000))
    assert torch.load(old, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in small_fs.iterdir()) == ["state.pt"]


# ---------------------------------------------------------------- run-directory lock

_HOLD = """
import sys, time
from argen.utils.io import run_lock
with run_lock(sys.argv[1], "argen train"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(ArgenError) as info:
            with run_lock(tmp_path / "run", "argen demo"):
                pass
        message = str(info.value)
        assert f"is in use by pid {proc.pid} (argen train)" in message and "started at" in message
        assert "\n" not in message
    finally:
        proc.kill()
        proc.wait()
    # the holder is dead: its lock is gone even though the lock file stays
    assert lock_path(tmp_path / "run").exists()
    with run_lock(tmp_path / "run", "argen demo") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    with run_lock(tmp_path, "argen a"):
        with run_lock(tmp_path, "argen b"):
            pass
        check = subprocess.run([sys.executable, "-c", _HOLD.replace("time.sleep(60)", "pass"), str(tmp_path)],
                               capture_output=True, text=True)
        assert check.returncode == 1 and f"in use by pid {os.getpid()} (argen a)" in check.stderr
    check = subprocess.run([sys.executable, "-c", _HOLD.replace("time.sleep(60)", "pass"), str(tmp_path)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_ranks_lock_separately(tmp_path):
    with run_lock(tmp_path, "argen extract-codes", rank=0), run_lock(tmp_path, "argen extract-codes", rank=1):
        assert lock_path(tmp_path, 1).name == ".argen.rank1.lock"


def test_lock_on_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArgenError, match="not a directory"):
        with run_lock(tmp_path / "f", "argen demo"):
            pass




# ---------------------------------------------------------------- crafted pickles are never run


class _Marker:
    """Unpickling this object runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _System:
    """Unpickling this object would run a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_torch(path, marker, payload=_Marker, legacy=False):
    if legacy:  # a plain pickle stream, not torch's zip container
        import pickle

        path.write_bytes(pickle.dumps({"step": 1, "payload": payload(marker)}, protocol=2))
        return path
    torch.save({"model": {"w": torch.zeros(2)}, "payload": payload(marker)}, path)
    return path


def _crafted_npy(path, marker):
    with open(path, "wb") as handle:
        np.save(handle, np.array([_Marker(marker)], dtype=object), allow_pickle=True)
    return path


def _crafted_npz(path, marker, **arrays):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays, payload=np.array([_Marker(marker)], dtype=object))
    return path


def _assert_refused_pickle(message, names):
    assert "\n" not in message
    assert "not allowed" in message and any(name in message for name in names), message
    assert "truncated or corrupt" not in message and "weights_only" not in message


RELEASED_GPT = dict(config="GPT-tiny", kind="c2i", image_size=64, downsample=16)


@pytest.mark.parametrize("payload, names", [(_Marker, ("io.open", "builtins.open")),
                                            (_System, ("posix.system", "os.system"))])
@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_released_checkpoints_are_refused_naming_the_objects(tmp_path, payload, names, legacy):
    from argen.checkpoint import load_gpt, load_tokenizer
    from argen.utils.errors import CheckpointError

    marker = tmp_path / "marker"
    path = _crafted_torch(tmp_path / "evil.pt", marker, payload, legacy)
    with pytest.raises(CheckpointError) as info:
        load_gpt(path, **RELEASED_GPT)
    _assert_refused_pickle(str(info.value), names)
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(path, config="VQ-tiny-16")
    _assert_refused_pickle(str(info.value), names)
    assert not marker.exists()


def test_crafted_pickle_named_like_an_argen_checkpoint_is_refused(tmp_path):
    from argen.checkpoint import load_gpt

    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    _crafted_torch(run / "gpt.safetensors", marker)
    with pytest.raises(ArgenError, match="truncated or corrupt"):
        load_gpt(run)
    assert not marker.exists()


def test_crafted_inception_and_lpips_weights_are_refused(tmp_path):
    from argen.models.inception import build_inception
    from argen.models.lpips import read_weights

    marker = tmp_path / "marker"
    path = _crafted_torch(tmp_path / "evil.pth", marker)
    with pytest.raises(ArgenError) as info:
        build_inception(str(path))
    _assert_refused_pickle(str(info.value), ("io.open",))
    for what in ("VGG16 weights", "LPIPS linear-head weights"):
        with pytest.raises(ArgenError) as info:
            read_weights(path, what)
        _assert_refused_pickle(str(info.value), ("io.open",))
    assert not marker.exists()


def test_crafted_evaluation_batches_and_stat_caches_do_not_run(tmp_path):
    from argen.evaluation.evaluate import _load_cache, open_batch

    marker = tmp_path / "marker"
    # object arrays inside a batch, and a raw pickle under an npz name
    evil = _crafted_npz(tmp_path / "ref.npz", marker, arr_0=np.array([_Marker(marker)], dtype=object))
    with pytest.raises(ArgenError):
        open_batch(evil, "reference batch")
    raw = _crafted_torch(tmp_path / "raw.npz", marker, legacy=True)
    with pytest.raises(ArgenError, match="cannot read"):
        open_batch(raw, "reference batch")
    # a crafted statistics cache is treated as no cache (the statistics are recomputed)
    cache = _crafted_npz(tmp_path / "x.stats.npz", marker, pool=np.zeros((4, 2048), np.float32),
                         mu=np.array([_Marker(marker)], dtype=object))
    assert _load_cache(cache) is None
    assert not marker.exists()


def test_crafted_sample_batch_shard_is_not_trusted(tmp_path):
    from argen.evaluation.sample_batch import _shard_done, assemble_batch, shard_path

    marker = tmp_path / "marker"
    path = shard_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    _crafted_npz(path, marker, images=np.array([_Marker(marker)], dtype=object), labels=np.zeros(1, np.int64))
    assert not _shard_done(path, 1, 16)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; the point is the marker
        assemble_batch(tmp_path, 1, 16, 1, "c2i", 0.0, False)
    assert not marker.exists()


def test_crafted_code_shards_and_text_features_are_refused(tmp_path):
    from argen.data.codes import CodeDataset
    from argen.data.text_features import TextFeatureStore
    from test_train import make_codes

    marker = tmp_path / "marker"
    codes = make_codes(tmp_path, kind="t2i")
    shard = sorted(codes.glob("codes-*.npy"))[0]
    _crafted_npy(shard, marker)
    with pytest.raises(ArgenError, match="cannot read shard"):
        CodeDataset(codes)
    features = sorted((tmp_path / "text").glob("*.npy"))
    assert features
    for file in features:
        _crafted_npy(file, marker)
    with pytest.raises(ArgenError, match="unreadable"):
        TextFeatureStore(tmp_path / "text")
    assert not marker.exists()


def test_crafted_caption_feature_file_is_refused(tmp_path):
    caption_files = pytest.importorskip("argen.data.caption_files")
    marker = tmp_path / "marker"
    npz = _crafted_npz(tmp_path / "captions.npz", marker, features=np.array([_Marker(marker)], dtype=object),
                       mask=np.ones((1, 1)))
    with pytest.raises(ArgenError, match="cannot read caption features"):
        caption_files.read_npz_features(npz)
    assert not marker.exists()


def test_crafted_demo_dataset_file_does_not_run(tmp_path):
    from argen.data.datasets import DemoDataset

    marker = tmp_path / "marker"
    path = _crafted_npz(tmp_path / "emoji.npz", marker, images=np.array([_Marker(marker)], dtype=object))
    with pytest.raises(Exception):  # noqa: B017 - a packaged file; the point is the marker
        DemoDataset("train", path=path)
    assert not marker.exists()


# ---------------------------------------------------------------- missing checkpoint paths


def test_missing_checkpoint_path_says_it_does_not_exist(tmp_path, capsys):
    from argen.checkpoint import load_gpt, load_tokenizer, save_tokenizer
    from argen.cli.main import main
    from conftest import tiny_tokenizer

    for load, what in ((load_gpt, "generator"), (load_tokenizer, "tokenizer")):
        for path in (tmp_path / "nope", tmp_path / "nope.pt", tmp_path / "nope.safetensors"):
            with pytest.raises(ArgenError) as info:
                load(path)
            assert str(info.value) == f"{what} checkpoint {path} does not exist"
    save_tokenizer(tiny_tokenizer(), tmp_path / "tok")
    code = main(["serve", "--tokenizer", str(tmp_path / "tok"), "--gpt", str(tmp_path / "nope"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"argen serve: error: generator checkpoint {tmp_path / 'nope'} does not exist"


def test_missing_generator_is_named_before_the_tokenizer_question(tmp_path, capsys):
    from argen.cli.main import main

    # without --tokenizer the old message asked for one, as if /nope were a released file
    code = main(["sample", "--gpt", str(tmp_path / "nope"), "--classes", "1", "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"argen sample: error: generator checkpoint {tmp_path / 'nope'} does not exist")
    code = main(["sample", "--gpt", "c2i_B_25", "--classes", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "c2i_B_25 does not exist" in err and "c2i_B_256" in err and "\n" not in err


# ---------------------------------------------------------------- a busy port


def test_serve_on_a_port_in_use_is_one_line_and_exit_2(tmp_path, capsys):
    import socket

    from argen.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        # the port is checked before the (here missing) checkpoints are opened
        code = main(["serve", "--tokenizer", str(tmp_path / "t"), "--gpt", str(tmp_path / "g"), "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == (f"argen serve: error: port {port} on 127.0.0.1 is already in use; stop the process that holds it "
                   f"or choose another --port")


# ---------------------------------------------------------------- a light start-up

_LIGHT = """
import sys
from argen.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "numpy", "transformers", "fastapi", "safetensors", "PIL") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


def _heavy_after(*argv):
    done = subprocess.run([sys.executable, "-c", _LIGHT, *argv], capture_output=True, text=True, timeout=120)
    line = [x for x in done.stdout.splitlines() if x.startswith("HEAVY")][-1]
    return line.split(" ", 1)[1] if " " in line else "", done.stderr


def test_help_version_and_argument_errors_do_not_import_torch():
    from argen.cli.main import SUBCOMMANDS

    for argv in (["--help"], ["--version"], ["no-such-command"]):
        heavy, _ = _heavy_after(*argv)
        assert heavy == "", (argv, heavy)
    for command in SUBCOMMANDS:
        heavy, _ = _heavy_after(command, "--help")
        assert heavy == "", (command, heavy)
        heavy, err = _heavy_after(command, "--no-such-flag")
        assert heavy == "" and "error:" in err and "Traceback" not in err, (command, heavy, err)


def test_argen_help_lists_every_command_with_its_summary(capsys):
    from argen.cli.main import SUBCOMMANDS, main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in SUBCOMMANDS)
    assert "Sample images from a tokenizer" in out and "FID, sFID, IS, precision and recall" in out


# ---------------------------------------------------------------- transformers' own progress bar


def test_text_encoder_loading_prints_no_progress_bar(capfd):
    from argen.data.text_encoders import load_text_encoder

    capfd.readouterr()
    load_text_encoder("minilm")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "%|" not in captured.err


# ---------------------------------------------------------------- every numeric flag is checked at parse time


def _numeric_actions():
    from argen.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, subparser in sub.choices.items():
        for action in subparser._actions:
            if action.type in (int, float) or action.type in common.NUMERIC_TYPES or \
                    getattr(action.type, "__name__", "").startswith(("int_range", "float_range")):
                yield command, subparser, action


# values that make sense for a few flags (a seed of 0, a temperature of 0, ...) are listed per type
_BAD = {
    "positive_int": ["0", "-1", "nan", "inf", "1.5"],
    "nonneg_int": ["-1", "nan", "inf"],
    "positive_float": ["0", "-1", "nan", "inf"],
    "nonneg_float": ["-1", "nan", "inf"],
    "finite_float": ["nan", "inf", "-inf"],
    "unit_interval": ["0", "-1", "nan", "inf", "1.5"],
    "probability": ["-1", "nan", "inf", "1"],
    "fraction": ["-1", "nan", "inf", "1.5"],
}


def _bad_values(action):
    name = getattr(action.type, "__name__", "")
    if name in _BAD:
        return _BAD[name]
    if name.startswith("int_range"):
        low = int(name.split("_")[2])
        return [str(low - 1), "nan", "inf"]
    if name.startswith("float_range"):
        low = float(name.split("_")[2])
        return [str(low - 1), "nan", "inf"]
    return None  # a bare int/float: not validated


def test_every_numeric_flag_of_every_command_is_validated(capsys):
    from argen.cli.main import main

    unchecked, wrong = [], []
    for command, _subparser, action in _numeric_actions():
        flag = action.option_strings[0] if action.option_strings else action.dest
        values = _bad_values(action)
        if values is None:
            unchecked.append(f"{command} {flag} (type={action.type.__name__})")
            continue
        for value in values:
            with pytest.raises(SystemExit) as info:
                main([command, f"{flag}={value}"])
            err = capsys.readouterr().err
            if info.value.code != 2 or "error:" not in err or "Traceback" in err or flag not in err:
                wrong.append(f"{command} {flag}={value}: exit {info.value.code}, {err.strip()[-120:]!r}")
    assert not unchecked, "numeric flags without a checking type: " + "; ".join(unchecked)
    assert not wrong, "; ".join(wrong)


# ---------------------------------------------------------------- run-directory locks in the commands


@pytest.mark.parametrize("argv", [
    ["extract-codes", "--tokenizer", "T", "--data", "demo", "--image-size", "16", "--out", "{out}"],
    ["demo", "--out", "{out}"],
    ["extract-text-features", "--data", "demo", "--out", "{out}"],
])
def test_commands_refuse_a_run_directory_in_use(tmp_path, capsys, argv):
    from argen.cli.main import main

    out = tmp_path / "run"
    proc = _holder(out)
    try:
        code = main([a.replace("{out}", str(out)) for a in argv])
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"is in use by pid {proc.pid} (argen train)" in err and "\n" not in err


# ---------------------------------------------------------------- cached demo reference statistics


def test_demo_reference_statistics_are_computed_once_per_network(tmp_path, monkeypatch):
    """`argen evaluate demo ...` used to run Inception over all 3,822 demo images on every call."""
    import argen.evaluation.evaluate as ev
    from argen.evaluation.fid import Activations

    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_activations(batches, inception, batch_size, total, desc, progress):
        calls.append(desc)
        count = sum(b.shape[0] for b in batches)
        rng = np.random.default_rng(len(calls))
        return Activations(rng.random((count, 4), np.float32), np.zeros(4), np.eye(4), np.zeros(2), np.eye(2))

    class Net:
        weights_id = "sha256:0123456789abcdef"

    monkeypatch.setattr(ev, "compute_activations", fake_activations)
    first, source = ev.batch_activations(ev.open_batch("demo", "reference", 6), Net(), 3, True, "reference", False)
    assert source == "computed" and calls == ["reference"]
    again, source = ev.batch_activations(ev.open_batch("demo", "reference", 6), Net(), 3, True, "reference", False)
    assert source == "cache" and calls == ["reference"] and np.array_equal(again.pool, first.pool)
    cached = list((tmp_path / "cache" / "stats").iterdir())
    assert len(cached) == 1 and "first6" in cached[0].name and "sha256-0123456789abcdef" in cached[0].name
    Net.weights_id = "sha256:fedcba9876543210"  # another network: computed again
    ev.batch_activations(ev.open_batch("demo", "reference", 6), Net(), 3, True, "reference", False)
    assert calls == ["reference", "reference"]
    ev.batch_activations(ev.open_batch("demo", "reference", 5), Net(), 3, True, "reference", False)
    assert len(calls) == 3  # other images (the first 5): computed again


def test_statistics_cache_falls_back_to_the_user_cache_for_a_read_only_folder(tmp_path, monkeypatch):
    import argen.evaluation.evaluate as ev
    from argen.evaluation.fid import Activations

    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    batch_dir = tmp_path / "ro"
    batch_dir.mkdir()
    np.savez(batch_dir / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    real_atomic_write = ev.atomic_write

    def refuse_ro(path, write, size=None):
        if Path(path).parent == batch_dir:
            raise PermissionError(errno.EACCES, "read-only")
        return real_atomic_write(path, write)

    monkeypatch.setattr(ev, "atomic_write", refuse_ro)
    calls = []

    def fake_activations(batches, inception, batch_size, total, desc, progress):
        calls.append(desc)
        count = sum(b.shape[0] for b in batches)
        return Activations(np.ones((count, 4), np.float32), np.zeros(4), np.eye(4), np.zeros(2), np.eye(2))

    class Net:
        weights_id = "random-seed0"

    monkeypatch.setattr(ev, "compute_activations", fake_activations)
    for expected in ("computed", "cache"):
        _, source = ev.batch_activations(ev.open_batch(batch_dir / "ref.npz", "r"), Net(), 2, True, "r", False)
        assert source == expected
    assert calls == ["r"] and len(list((tmp_path / "cache" / "stats").iterdir())) == 1


def test_a_full_disk_anywhere_in_a_command_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import argen.cli.evaluate as evaluate_cli
    from argen.cli.main import main

    log = tmp_path / "log.jsonl"

    def append_log(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(log))

    monkeypatch.setattr(evaluate_cli, "run", append_log)
    assert main(["evaluate", "r.npz", "s.npz", "--inception", "random"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"argen evaluate: error: no space left on device while writing {log}: the filesystem "
                          f"mounted at ") and " free" in err and "\n" not in err

    def torch_full(args):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(evaluate_cli, "run", torch_full)
    assert main(["evaluate", "r.npz", "s.npz", "--inception", "random"]) == 2
    assert capsys.readouterr().err.startswith("argen evaluate: error: no space left on device (")

    def bug(args):
        raise RuntimeError("a programming error keeps its traceback")

    monkeypatch.setattr(evaluate_cli, "run", bug)
    with pytest.raises(RuntimeError, match="programming error"):
        main(["evaluate", "r.npz", "s.npz", "--inception", "random"])


def test_atomic_writes_get_the_usual_file_mode_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = atomic_write_bytes(tmp_path / "x.bin", b"x")
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask


def test_demo_follows_the_progress_rule(tmp_path, monkeypatch):
    import argen.training.demo as demo
    from argen.cli.main import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda options: seen.append(options.progress))
    monkeypatch.setattr(sys, "stderr", _Stream(False))
    for flags in ([], ["--progress"], ["--no-progress"]):
        assert main(["demo", "--out", str(tmp_path / "d"), *flags]) == 0
    assert seen == [False, True, False]


def test_random_bytes_as_a_torch_file_are_always_one_argen_error(tmp_path, recwarn):
    import numpy as np

    from argen.utils.torch_utils import load_torch_file

    rng = np.random.default_rng(0)  # 300 seeded files hit IndexError, UnicodeDecodeError, ... inside torch's unpickler
    path = tmp_path / "state.pt"
    for _ in range(300):
        path.write_bytes(rng.bytes(4096))
        with pytest.raises(ArgenError, match="truncated or corrupt"):
            load_torch_file(path, what="training checkpoint")
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
