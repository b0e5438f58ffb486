"""dvc.yaml checked against the code: a stage depends on every module its command runs and declares
every params section its code reads, so that a change to either re-runs it (and nothing stale is
reported as up to date).

What a stage runs: `lethe <stage> [key]` calls `lethe.stages.<stage>`; its code is that module and
every `lethe` module it imports, at the top or inside a function, transitively. One exception, by
design: the registry (`lethe.methods`) imports every method's declaration to know its name and params
schema, but a stage runs the hooks of its own method only (`train@wen_filter`: `lethe.methods.wen_filter`
and what its hooks import), so the other declarations and the registry's list are not its
dependencies. Registering a method re-runs no other stage.

What a stage reads: the sections named as `params.<section>` in that code (and the sections its own
method declares). `tracking` is left out: it says where results are logged, not what they are. An
evaluated mitigation's own section is left out too: `mitigate` packaged its settings into the model,
which the evaluation depends on.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from lethe.config import Params
from lethe.methods import INFERENCE, TRAINING

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SECTIONS = set(Params.model_fields) - {"tracking"}
REGISTRY = "lethe.methods"


def module_path(name: str) -> Path | None:
    """The source file of a `lethe` module, found without importing it."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def imported(name: str) -> frozenset[str]:
    """The `lethe` modules a module imports anywhere in its body (a `from pkg import module` counts the module)."""
    tree = ast.parse(module_path(name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lethe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lethe"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_path(f"{node.module}.{a.name}")}
    return frozenset(m for m in found if module_path(m))


def own_methods(stage: str, key: str | None) -> list[str]:
    """The declarations whose hooks the stage runs: train and mitigate run their method's, evaluate an
    inference-time mitigation's sampling hooks, localize NeMo's."""
    if stage in ("train", "mitigate") or (stage == "evaluate" and key in INFERENCE):
        return [f"{REGISTRY}.{key}"]
    return [f"{REGISTRY}.nemo"] if stage == "localize" else []


def closure(stage: str, key: str | None) -> set[str]:
    """Every module `lethe <stage> [key]` runs, following the rule in the module docstring."""
    seen, todo = set(), [f"lethe.stages.{stage}", *own_methods(stage, key)]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [] if name == REGISTRY else imported(name)  # the registry's declarations: not run
    return seen - {REGISTRY}


def sections_read(modules: set[str]) -> set[str]:
    text = "\n".join(module_path(m).read_text() for m in modules)
    return {s for s in re.findall(r"\bparams\.(\w+)", text) if s in SECTIONS}


def expanded_stages() -> list[tuple[str, str, str | None, dict]]:
    """(dvc stage name, lethe stage, key, definition) for every stage, foreach expanded with DVC's ${} syntax."""
    out = []
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if "foreach" not in stage:
            out.append((name, stage["cmd"].split()[1], None, stage))
            continue
        items = stage["foreach"]
        assert not isinstance(items, str), f"{name}: list foreach's keys in dvc.yaml, not from params ({items})"
        for key, item in (items.items() if isinstance(items, dict) else ((k, k) for k in items)):
            text = yaml.safe_dump(stage["do"]).replace("${key}", key)
            for field, value in (item.items() if isinstance(item, dict) else ()):
                text = text.replace(f"${{item.{field}}}", str(value))
            text = text.replace("${item}", str(item))
            definition = yaml.safe_load(text)
            out.append((f"{name}@{key}", definition["cmd"].split()[1], key, definition))
    return out


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def missing_deps(stage: str, key: str | None, definition: dict) -> list[str]:
    deps = [(ROOT / d).resolve() for d in _paths(definition.get("deps"))]
    files = sorted(module_path(m).resolve() for m in closure(stage, key))
    return [str(f.relative_to(ROOT)) for f in files
            if f.name != "__init__.py" or f.read_text().strip().count("\n") > 2  # docstring-only packages
            if not any(f == d or d in f.parents for d in deps)]


def missing_params(stage: str, key: str | None, definition: dict) -> list[str]:
    declared = {p.split(".")[0] for p in _paths(definition.get("params"))}
    method = TRAINING.get(key) or INFERENCE.get(key)
    reads = sections_read(closure(stage, key)) | set(method.reads if method and stage in ("train", "mitigate") else ())
    if stage == "evaluate" and method:  # a mitigation's settings come packaged in the model, a dependency
        reads -= {method.section}
    partial = {p.split(".")[0] for p in _paths(definition.get("params")) if "." in p}
    return sorted(reads - declared - partial)


STAGES = expanded_stages()


@pytest.mark.parametrize("name, stage, key, definition", STAGES, ids=[s[0] for s in STAGES])
def test_stage_depends_on_every_module_it_runs(name, stage, key, definition):
    assert not missing_deps(stage, key, definition), f"{name}: add to its deps in dvc.yaml"


@pytest.mark.parametrize("name, stage, key, definition", STAGES, ids=[s[0] for s in STAGES])
def test_stage_declares_every_params_section_it_reads(name, stage, key, definition):
    assert not missing_params(stage, key, definition), f"{name}: add to its params in dvc.yaml"


@pytest.mark.parametrize("name, stage, key, definition", STAGES, ids=[s[0] for s in STAGES])
def test_stage_depends_on_its_methods_inputs(name, stage, key, definition):
    method = TRAINING.get(key) or INFERENCE.get(key)
    if stage in ("train", "mitigate") and method:
        assert set(method.needs) <= set(_paths(definition.get("deps"))), name


def test_every_declared_method_has_its_stages():
    names = {s[0] for s in STAGES}
    for method in TRAINING:
        assert {f"train@{method}", f"evaluate@{method}"} <= names, method
    for name, mitigation in INFERENCE.items():
        assert f"evaluate@{name}" in names, name
        assert (f"mitigate@{name}" if mitigation.stage == "mitigate" else mitigation.stage) in names, name


def test_dvc_yaml_names_the_paths_the_code_shares():
    """Each path in `lethe.paths` that a stage writes or reads is one dvc.yaml names (the caches under
    .lethe/ stay outside DVC: it would delete them before a re-run; so does `lethe repro`'s share of the cores)."""
    from pathlib import PurePath

    from lethe import paths

    text = (ROOT / "dvc.yaml").read_text()
    shared = {name: value for name, value in vars(paths).items() if isinstance(value, PurePath)}
    outside = {name for name, value in shared.items() if value.parts[0] == ".lethe"}
    assert outside == {"CHECKPOINTS", "LATENTS", "FEATURES", "AUDIT_CACHE", "REPRO_CORES"}
    missing = [f"{name} = {value}" for name, value in shared.items() if name not in outside and str(value) not in text]
    assert not missing, f"dvc.yaml does not name {missing}"
