"""The project's shape: no import cycle inside wvdata/, wvdata never imports trainer/, files stay
under 600 lines, and every stage's CLI flags match the options its function takes."""
from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wvdata"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Modules a file imports, at module level or lazily inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import engine` names a module
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path):
            while imp and imp not in modules:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def test_no_import_cycle_inside_wvdata():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            # a package's __init__ importing its own submodules is not a cycle of concern;
            # a submodule importing a module that imports it back is
            if state.get(dep) == 1 and not node.startswith(dep + "."):
                raise AssertionError(" -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_detector_sees_a_cycle(monkeypatch):
    """The cycle check above can fail: a planted a -> b -> a is reported."""
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: {"a": {"b"}, "b": {"a"}})
    with pytest.raises(AssertionError, match="a -> b -> a"):
        test_no_import_cycle_inside_wvdata()


def test_wvdata_never_imports_trainer():
    bad = [str(p) for p in PACKAGE.rglob("*.py") if any(i.split(".")[0] == "trainer" for i in _imports(p))
           or "import trainer" in p.read_text() or "from trainer" in p.read_text()]
    assert not bad


def test_no_file_over_600_lines():
    files = [p for d in ("wvdata", "trainer", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")
             if "out" not in p.relative_to(ROOT).parts]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 600}
    assert not long


def test_build_flags_are_the_build_options():
    from wvdata.build import BuildOptions
    from wvdata.cli import make_parser

    build_parser = make_parser()._subparsers._group_actions[0].choices["build"]
    dests = {a.dest for a in build_parser._actions}
    assert {f.name for f in fields(BuildOptions)} <= dests
    args = build_parser.parse_args(["src", "-o", "out", "--resize-short", "256", "--shard-size", "64MB",
                                    "--splits", "train,val"])
    from wvdata._args import options_from

    opts = options_from(args, BuildOptions)
    assert opts == BuildOptions(resize_short=256, shard_size=64 << 20, splits=("train", "val"))
    assert opts.image().resize_short == 256


def test_unknown_build_option_names_the_known_ones(tmp_path):
    from wvdata import build

    with pytest.raises(TypeError, match="unknown build option.*resize_shrt.*known:.*resize_short"):
        build(tmp_path, tmp_path / "out", resize_shrt=256)
    with pytest.raises(ValueError, match="unknown split"):
        build(tmp_path, tmp_path / "out", splits=("train", "vall"))


@pytest.mark.parametrize("module", ["build", "info", "views", "dedup", "verify", "embed", "curriculum", "aum"])
def test_every_stage_registers_its_own_subcommand(module):
    import argparse
    import importlib

    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(f"wvdata.{module}").add_cli(sub)
    (name, parser), = sub.choices.items()
    assert callable(parser.get_default("func"))
    undocumented = [a.dest for a in parser._actions if not a.help and a.dest != "help"]
    assert not undocumented, f"`wvdata {name}` arguments without help: {undocumented}"


def test_search_method_by_cost():
    from wvdata.dedup.search import choose_method, search_costs

    # a few thousand images: exhaustive search; a million 64-bit codes: multi-index hashing
    assert choose_method(7 * 2_000, 2_000, 64, 10) == "flat"
    assert choose_method(7 * 1_000_000, 1_000_000, 64, 10) == "mih"
    costs = search_costs(1_000_000, 1_000_000, 64, 10)  # the benchmark's measured ordering
    assert costs["mih"] < costs["flat"] < costs["multihash"]
