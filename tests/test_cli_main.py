"""The `argen` entry point: --version, per-command help, and the error contract (one line, exit 2)."""

from __future__ import annotations

from importlib.metadata import version

import pytest

import argen
from argen.cli.main import SUBCOMMANDS, main


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"argen {version('argen')}"
    assert version("argen") == argen.__version__


def test_commands_work_from_a_source_tree_without_package_metadata(capsys, monkeypatch):
    from importlib.metadata import PackageNotFoundError

    import argen.cli.main as cli_main

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(cli_main, "version", not_installed)  # e.g. PYTHONPATH=src on a machine without the install
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"argen {argen.__version__}"


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: argen {command}" in capsys.readouterr().out


def test_library_errors_become_one_line_and_exit_status_2(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main(["sample", "--tokenizer", str(missing), "--gpt", str(missing), "--classes", "1",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("argen sample: error: ") and "\n" not in err and "nope.pt" in err


@pytest.mark.parametrize("argv", [["sample", "--gpt", "g", "--classes", "1", "--n", "0"], ["no-such-command"], [],
                                  ["evaluate", "--no-such-flag"]])
def test_argument_errors_are_one_line_and_exit_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and "usage:" not in err, err
