"""The layers read from the bottom up: algorithm modules never import a stage, and what every command
reads first (params, declarations, the CLI's choices) stays free of torch."""

from __future__ import annotations

import subprocess
import sys

from tests.test_pipeline_deps import SRC, imported

# the command layer: the stages, the CLI, and what starts processes that run the CLI (lethe repro, the warm server)
ENTRY_POINTS = ("lethe.stages", "lethe.cli", "lethe.repro", "lethe.warm")


def lethe_modules() -> list[str]:
    return sorted(".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                  for p in (SRC / "lethe").rglob("*.py"))


def test_no_algorithm_module_imports_a_stage():
    offenders = [(m, i) for m in lethe_modules() if not m.startswith(ENTRY_POINTS)
                 for i in imported(m) if i.startswith(ENTRY_POINTS)]
    assert not offenders, f"algorithm modules import stage modules: {offenders}"


def test_the_rule_sees_a_stage_import(tmp_path, monkeypatch):
    """The check above can fail: a module that imports a stage, even inside a function, is caught."""
    package = tmp_path / "lethe"
    package.mkdir()
    (package / "culprit.py").write_text("def f():\n    from lethe.stages.evaluate import evaluate\n")
    (package / "stages").mkdir()
    (package / "stages" / "evaluate.py").write_text("def evaluate(params, variant): ...\n")
    monkeypatch.setattr("tests.test_pipeline_deps.SRC", tmp_path)
    imported.cache_clear()
    try:
        assert imported("lethe.culprit") == {"lethe.stages.evaluate"}
    finally:
        imported.cache_clear()


def test_params_declarations_and_cli_choices_load_without_torch():
    code = ("import sys, lethe.cli, lethe.config; lethe.cli.parser(); lethe.config.load_params('params.yaml'); "
            "print(sorted(m for m in ('torch', 'lightning', 'diffusers', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC.parent, check=True)
    assert out.stdout.strip() == "[]"
