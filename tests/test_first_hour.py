"""What a newcomer meets in the first hour: the README matches the clone, every command's help
is complete, bad values are one-line errors, and no warning the user cannot act on is printed."""
from __future__ import annotations

import re
import subprocess
import warnings
from pathlib import Path

import pytest

from wvdata import __version__
from wvdata.cli import STAGES, main, make_parser

ROOT = Path(__file__).resolve().parent.parent


def _subparsers():
    return make_parser()._subparsers._group_actions[0].choices


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"wvdata {__version__}"


def test_every_argument_of_every_command_has_help_and_shows_its_default():
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"wvdata {name} {action.dest}: no help"
        text = parser.format_help()
        assert "(default: None)" not in text, name
    build = " ".join(_subparsers()["build"].format_help().split())  # help text is wrapped
    assert "(default: 90)" in build and "(default: train,val,test)" in build and "(default: 0)" in build


@pytest.mark.parametrize("argv,message", [
    (["view", "ds", "v", "--per-class", "0"], "--per-class: must be at least 1, got 0"),
    (["build", "src", "-o", "out", "--resize-short", "-3"], "--resize-short: must be at least 1, got -3"),
    (["build", "src", "-o", "out", "--shard-size", "0"], "a size must be positive"),
    (["build", "src", "-o", "out", "--quality", "101"], "JPEG quality is 1..100"),
    (["view", "ds", "v", "--drop-aum", "1.5"], "must be a fraction in [0, 1)"),
    (["dedup", "ds", "--workers", "0"], "--workers: must be at least 1"),
])
def test_invalid_values_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_a_missing_dataset_is_one_line(capsys, tmp_path):
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a finished dataset" in err


def test_nothing_in_the_repository_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    texts = [p for p in tracked if p.endswith((".py", ".md", ".toml", "Makefile", ".txt")) and Path(ROOT, p).is_file()]
    assert len(texts) > 20
    bad = [p for p in texts if re.search(r"\.\./shared|DESIGN\.md", Path(ROOT, p).read_text(errors="replace"))]
    assert not bad


def test_the_readme_lists_real_commands_and_files():
    readme = (ROOT / "README.md").read_text()
    commands = set(re.findall(r"^\| `wvdata (\w+)", readme, flags=re.M))
    assert commands and commands <= set(_subparsers())
    assert "source .venv/bin/activate" in readme
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)]+)\)", readme):
        assert (ROOT / link).exists(), link
    assert set(STAGES) - {"views"} <= set(_subparsers()) | {"views"}


def test_dali_randaugment_prints_no_deprecation_warnings(webvision_dataset):
    from wvdata.stream import loader

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ld = loader(webvision_dataset, backend="dali", batch_size=4, image_size=32, num_workers=1, rank=0,
                    world_size=1, randaug=(2, 9))
        next(iter(ld))
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in caught]


def test_loader_workers_default_to_the_machine(webvision_dataset):
    import os

    from wvdata.stream import loader

    ld = loader(webvision_dataset, batch_size=4, rank=0, world_size=1)
    assert ld.num_workers == min(8, os.cpu_count() or 1)
