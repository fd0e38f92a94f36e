"""Packaging: what `pip install .` ships and declares, checked without building a wheel (too slow for CI).

The wheel must contain every subpackage, the installed package must be importable from any directory (the
scripts no longer edit sys.path), and every third-party import must be declared in pyproject.toml: top-level
imports of the library as dependencies, lazy ones at least in an extra, the tests' in the `dev` extra.
"""

import ast
import fnmatch
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
NAME = PROJECT["name"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packages_on_disk() -> set[str]:
    """Every directory under alignq_jax/ that holds Python modules, as a dotted name."""
    found = set()
    for d, dirs, files in os.walk(ROOT / "alignq_jax"):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            found.add(".".join(Path(d).relative_to(ROOT).parts))
    return found


def _subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


# ---------------------------------------------------------------------------------------------- what is shipped


def test_every_subpackage_has_an_init_and_is_discovered():
    from setuptools import find_namespace_packages, find_packages

    on_disk = _packages_on_disk()
    missing_init = sorted(p for p in on_disk if not (ROOT / p.replace(".", "/") / "__init__.py").is_file())
    assert not missing_init, f"directories with modules but no __init__.py: {missing_init}"

    setuptools_cfg = PYPROJECT.get("tool", {}).get("setuptools", {})
    packages = setuptools_cfg.get("packages")
    if isinstance(packages, list):
        shipped = set(packages)
    else:
        find = packages["find"]
        finder = find_namespace_packages if find.get("namespaces", True) else find_packages
        shipped = set(finder(str(ROOT / find.get("where", ["."])[0]), include=find.get("include", ("*",)),
                             exclude=find.get("exclude", ())))
    assert sorted(on_disk - shipped) == [], "subpackages left out of the wheel"
    assert sorted(shipped - on_disk) == [], "the wheel would ship packages other than alignq_jax's"
    # Sanity of the walk itself: the layers named in alignq_jax/__init__.py are there.
    assert {"alignq_jax", "alignq_jax.cli", "alignq_jax.data", "alignq_jax.models", "alignq_jax.training"} <= on_disk


def test_version_is_static_and_matches_the_package():
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "alignq_jax.__version__"}
    tree = ast.parse((ROOT / "alignq_jax" / "__init__.py").read_text())
    literal = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
               and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["__version__"]]
    # setuptools reads a string literal without importing the package (and so without jax at build time).
    assert len(literal) == 1 and re.fullmatch(r"\d+\.\d+\.\d+", literal[0])
    assert importlib.metadata.version(NAME) == literal[0], "installed metadata is stale: pip install -e '.[dev]'"


def test_installed_package_imports_from_any_directory_and_is_this_checkout(tmp_path):
    """`from alignq_jax import quantize` outside the repository works only when the package is installed."""
    code = "import alignq_jax; from alignq_jax import quantize; print(quantize.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"alignq_jax is not importable outside the checkout (pip install -e .):\n{out.stderr}"
    installed = Path(out.stdout.strip().splitlines()[-1]).parent
    # Editable install: the checkout itself. A regular install must hold the same modules with the same text
    # (a stale or partial install would make the script and notebook tests run other code).
    local = {p.relative_to(ROOT / "alignq_jax"): p.read_bytes() for p in (ROOT / "alignq_jax").rglob("*.py")}
    there = {p.relative_to(installed): p.read_bytes() for p in installed.rglob("*.py")}
    assert sorted(map(str, set(local) ^ set(there))) == [], f"{installed} differs from the checkout's files"
    assert [str(p) for p in local if local[p] != there[p]] == [], f"{installed} holds other versions of these"


def test_console_scripts_resolve_to_the_cli_mains():
    declared = PROJECT["scripts"]
    installed = {e.name: e.value for e in importlib.metadata.distribution(NAME).entry_points
                 if e.group == "console_scripts"}
    assert installed == declared, "installed entry points are stale: pip install -e '.[dev]'"
    for name, target in declared.items():
        module, func = target.split(":")
        ep = importlib.metadata.EntryPoint(name, target, "console_scripts")
        assert callable(ep.load()), f"{name} -> {target} is not callable"
        assert module.startswith("alignq_jax.cli."), module


def test_scripts_do_not_edit_sys_path():
    offenders = []
    for path in sorted([*ROOT.glob("experiments/*.py"), *ROOT.glob("benchmarks/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("script", ["experiments/cifar10.py", "experiments/svhn.py", "experiments/digits.py",
                                    "experiments/ablation.py"])
def test_experiment_scripts_run_from_another_directory(tmp_path, script):
    # sys.path[0] is experiments/, not the repository root: the import only works through the installed package.
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, env=_subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "--bits" in out.stdout


# -------------------------------------------------------------------------------------------- what is declared


def _extra_closure(extra: str) -> set[str]:
    """Normalised distribution names of an extra, following self-references like alignq_jax[tfds,demo]."""
    names = set()
    for spec in PROJECT["optional-dependencies"][extra]:
        req = Requirement(spec)
        if _norm(req.name) == _norm(NAME):
            for inner in req.extras:
                names |= _extra_closure(inner)
        else:
            names.add(_norm(req.name))
    return names


CORE = {_norm(Requirement(s).name) for s in PROJECT["dependencies"]}
ALL_EXTRAS = set().union(*(_extra_closure(e) for e in PROJECT["optional-dependencies"]))


def _third_party_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, imported at module level) for each import; skips relative imports and probes
    inside `try: ... except ImportError`."""
    tree = ast.parse(path.read_text())
    probes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers
        ):
            probes |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in probes:
            continue
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods = [node.module]
        else:
            continue
        top_level = node in tree.body
        for mod in mods:
            top = mod.split(".")[0]
            if top in sys.stdlib_module_names or top in ("__future__", "alignq_jax", "conftest"):
                continue
            if (path.parent / f"{top}.py").is_file():  # a helper module beside the file (tests/tiny_data.py)
                continue
            found.append((top, node.lineno, top_level))
    return found


def _undeclared(paths, allowed_top, allowed_lazy) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in paths:
        for mod, line, top_level in _third_party_imports(path):
            dists = {_norm(d) for d in providers.get(mod, [])}
            allowed = allowed_top if top_level else allowed_lazy
            if not dists & allowed:
                where = "dependencies" if allowed is CORE else "an extra"
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {mod} (from {sorted(dists) or 'nothing'}"
                                f" installed), not declared in {where}")
    return problems


def test_library_imports_are_declared():
    files = sorted((ROOT / "alignq_jax").rglob("*.py"))
    assert _undeclared(files, CORE, CORE | ALL_EXTRAS) == []


def test_test_and_script_imports_are_declared():
    dev = CORE | _extra_closure("dev")
    assert _undeclared(sorted((ROOT / "tests").glob("*.py")), dev, dev) == []
    scripts = sorted([*ROOT.glob("experiments/*.py"), *ROOT.glob("benchmarks/*.py")])
    assert _undeclared(scripts, CORE | ALL_EXTRAS, CORE | ALL_EXTRAS) == []


def test_requirements_txt_installs_this_project_with_the_dev_extra():
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    project_lines = [ln for ln in lines if re.fullmatch(r"(-e\s+)?\.\[[^\]]*\]", ln)]
    assert len(project_lines) == 1, f"requirements.txt must install the checkout with its extras: {lines}"
    assert "dev" in re.search(r"\[(.*)\]", project_lines[0]).group(1).split(",")
    # Anything else pinned there must not contradict pyproject's lower bounds.
    declared = {_norm(Requirement(s).name): Requirement(s).specifier
                for s in PROJECT["dependencies"] + [s for e in PROJECT["optional-dependencies"].values() for s in e]}
    for ln in lines:
        if ln in project_lines:
            continue
        req = Requirement(ln)
        assert str(req.specifier) == str(declared.get(_norm(req.name), req.specifier)), ln


def test_environment_satisfies_the_declared_ranges():
    """The suite runs against versions inside the declared ranges (else its result says nothing about them)."""
    installed_reqs = importlib.metadata.requires(NAME) or []
    declared = PROJECT["dependencies"] + [
        f"{s}; extra == \"{e}\"" for e, specs in PROJECT["optional-dependencies"].items() for s in specs]
    assert sorted(map(str, map(Requirement, installed_reqs))) == sorted(map(str, map(Requirement, declared))), (
        "installed metadata is stale: pip install -e '.[dev]'")
    for spec in PROJECT["dependencies"] + [s for e in PROJECT["optional-dependencies"].values() for s in e]:
        req = Requirement(spec)
        if _norm(req.name) == _norm(NAME):
            continue
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} outside {req.specifier}"
    # No upper bounds on the JAX stack: pip would replace a newer preinstalled jax/jaxlib (Colab's TPU runtime).
    for spec in PROJECT["dependencies"]:
        req = Requirement(spec)
        assert all(s.operator in (">=", "!=") for s in req.specifier), spec
