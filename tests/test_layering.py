"""The package's layers import only downward (contract in pyproject.toml, checked by import-linter)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path, cwd: Path) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import sys
        from importlinter.cli import lint_imports
        sys.exit(lint_imports(config_filename="pyproject.toml", no_cache=True))
    """)
    env_path = str(root / "src")
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": ""})


def test_layers_import_only_downward():
    result = _lint(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout


def test_layer_contract_catches_an_upward_import(tmp_path):
    """The check can fail: a copy of the package where utils imports the cli is rejected."""
    import shutil

    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "src" / "argen" / "utils" / "upward.py"
    bad.write_text("import argen.cli.main\n")
    result = _lint(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout


@pytest.mark.parametrize("module", ["argen", "argen.models.gpt", "argen.models.tokenizer"])
def test_import_changes_no_global_torch_state(module):
    code = textwrap.dedent(f"""
        import torch
        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                  torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                  torch.get_float32_matmul_precision())
        import {module}
        after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                 torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                 torch.get_float32_matmul_precision())
        assert before == after, (before, after)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert result.returncode == 0, result.stderr
