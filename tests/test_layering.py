"""The packages import in one direction only, and the serving code never imports training.

The layers, top to bottom: clients -> server -> model -> cache. A package may import its
own modules and those of any layer below it, never one above. `training/` (the demo
model's training) sits beside `model/`: it may import `model` and `cache`, and nothing
imports it except exactly two lazy imports, inside the CLI's `train-demo` and `eval-demo`
commands (`cmd_train_demo`, `cmd_eval_demo` in server/cli.py), which run only when a user
asks to train or evaluate. (The clients' stricter rule, only `server.protocol`, is checked
at runtime by tests/clients/test_client.py.)

Checked twice: statically, every import statement of every module (imports inside
functions included), and at runtime, a server brought up to ready holds no `training`
module.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.support.sources import REPO, package_sources

# what each package may import from the project (itself included)
ALLOWED = {
    "cache": {"cache"},
    "model": {"model", "cache"},
    "server": {"server", "model", "cache"},
    "clients": {"clients", "server", "model", "cache"},
    "training": {"training", "model", "cache"},
}
PROJECT = set(ALLOWED) | {"tests", "bench"}
# the only imports of training from the other packages: (file, enclosing function)
TRAINING_ENTRY_POINTS = {("server/cli.py", "cmd_train_demo"), ("server/cli.py", "cmd_eval_demo")}


def _imports(source: str, module: str) -> list[tuple[str, int, str | None]]:
    """(imported module, line, enclosing function or None) for every import in `source`;
    relative imports are resolved against `module` (dotted, e.g. "model.offline")."""
    found: list[tuple[str, int, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")[: -child.level]
                    name = ".".join([*base, child.module] if child.module else base)
                else:
                    name = child.module or ""
                found.append((name, child.lineno, func))
            inner = (
                child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            )
            visit(child, inner)

    visit(ast.parse(source), None)
    return found


def layering_violations(path: str, source: str) -> list[str]:
    """Every import in the file at `path` (relative to the repo) that breaks the rule."""
    package = path.split("/")[0]
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    bad = []
    for name, line, func in _imports(source, module):
        top = name.split(".")[0]
        if top not in PROJECT or top in ALLOWED[package]:
            continue
        if top == "training" and (path, func) in TRAINING_ENTRY_POINTS:
            continue
        where = f" (in {func})" if func else ""
        bad.append(f"{path}:{line}: {package} imports {name}{where}")
    return bad


def _sources() -> dict[str, str]:
    return package_sources(ALLOWED)


def test_no_import_runs_up_the_layers_or_into_training():
    sources = _sources()
    assert {"server/app.py", "model/generator.py", "cache/kv.py", "training/run.py"} <= set(sources)
    bad = [v for path, src in sources.items() for v in layering_violations(path, src)]
    assert not bad, "\n".join(bad)
    # the two entry points still exist: the allowance is not for imports that are gone
    cli = _imports(sources["server/cli.py"], "server.cli")
    assert {(f, n) for n, _, f in cli if n.startswith("training")} == {
        (func, "training.run") for _, func in TRAINING_ENTRY_POINTS
    }


def test_the_check_sees_imports_inside_functions_and_relative_ones():
    lazy = "def load():\n    if True:\n        from training.vocab import vocabulary\n"
    assert layering_violations("model/generator.py", lazy) == [
        "model/generator.py:3: model imports training.vocab (in load)"
    ]
    assert layering_violations("cache/pool.py", "import model.config\n") == [
        "cache/pool.py:1: cache imports model.config"
    ]
    assert layering_violations("model/offline.py", "from server.settings import x\n")
    assert layering_violations("training/run.py", "from server import cli\n")
    assert _imports("from .vocab import PALETTE\n", "training.probe") == [
        ("training.vocab", 1, None)
    ]
    # train-demo's import is allowed in its command, not elsewhere in the CLI
    top_level = "from training.run import run_train_demo\n"
    assert layering_violations("server/cli.py", top_level)
    in_cmd = "def cmd_train_demo(args):\n    from training.run import run_train_demo\n"
    assert not layering_violations("server/cli.py", in_cmd)


def test_a_ready_server_has_imported_no_training_module():
    """The demo preset (bundled weights, vocabulary) brought up to ready, warm-up chunk
    generated and encoded, its models listed: still no `training` module loaded."""
    code = """
import sys, time
from fastapi.testclient import TestClient
import server.cli
from server.app import create_app
from server.settings import Settings

server.cli.build_parser()
app = create_app(Settings(preset="demo", device="cpu", threads=1))
with TestClient(app) as client:
    deadline = time.monotonic() + 240
    while (ready := client.get("/readyz")).status_code != 200:
        assert ready.json()["reason"] == "warming up", ready.json()  # a failed start: say why
        assert time.monotonic() < deadline, "not ready in 240 s"
        time.sleep(0.2)
    models = client.get("/v1/models").json()
    assert models["vocabulary"], models
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "training")
assert not loaded, loaded
assert "model.generator" in sys.modules  # the model really was loaded
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
