"""The shape docs/ARCHITECTURE.md gives the code: imports point one way, and nothing heavy happens at import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import minigpt_cli

PACKAGE = Path(minigpt_cli.__file__).resolve().parent

# docs/ARCHITECTURE.md's module table, top to bottom: a module may import only modules before it. The commands
# package is one layer: each of its modules (commands/train.py, ...) may import only modules before it.
ORDER = ["config", "rundir", "progress", "tokenizer", "device", "batches", "corpus", "kv_cache", "model", "optim", "inference",
         "scoring", "checkpoint", "sampler", "budget", "ranks", "run_state", "train_eval", "trainer", "plan", "evaluate",
         "targets", "bench_state", "bench_sample", "heads", "bench", "inspection", "lens", "runs", "clock", "output",
         "views", "options", "commands", "cli", "__main__"]


def package_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minigpt_cli."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "minigpt_cli":
            found |= {alias.name for alias in node.names
                      if (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir()}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minigpt_cli.")}
    return found


def test_imports_point_one_way():
    files = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    files |= {f"commands/{p.stem}": p for p in (PACKAGE / "commands").glob("*.py")}
    unplaced = [m for m in files if m.split("/")[0] not in ORDER]
    assert not unplaced, f"place these modules in ORDER (and in docs/ARCHITECTURE.md's table): {unplaced}"
    for module, path in sorted(files.items()):
        layer = module.split("/")[0]
        for imported in package_imports(path):
            assert ORDER.index(imported) < ORDER.index(layer), f"{module} imports {imported}, which comes after it"


def test_help_config_and_tokenizer_do_not_import_torch():
    code = ("import sys; from minigpt_cli import config, tokenizer, cli; "
            "from typer.testing import CliRunner; r = CliRunner().invoke(cli.app, ['--help']); "
            "assert r.exit_code == 0, r.output; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_listing_runs_imports_no_torch(tiny_run: Path):
    """`minigpt runs` answers at once: reading a run's JSON and safetensors header needs no torch."""
    code = ("import sys; from minigpt_cli import cli; from typer.testing import CliRunner; "
            f"r = CliRunner().invoke(cli.app, ['runs', {str(tiny_run.parent)!r}, '--json']); "
            "assert r.exit_code == 0, r.output; assert '\"finished\"' in r.output, r.output; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_architecture_document_names_every_module():
    """docs/ARCHITECTURE.md is the design kept current: a module it does not describe is a gap in it."""
    document = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")]
    missing = [m for m in modules if f"`{m}`" not in document]
    assert not missing, f"describe these modules in docs/ARCHITECTURE.md: {missing}"
