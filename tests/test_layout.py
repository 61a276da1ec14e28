"""The layout stays readable: no module over 600 lines, no function over 100, and every root module
and package is under the layering contracts (.importlinter) and named in the README's layout.

Tests, bench/ (measurement scripts) and generated files are not held to the sizes."""

from __future__ import annotations

import ast
import configparser
import re
import subprocess

from tests.conftest import ROOT

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
EXEMPT_PREFIXES = ("tests/", "bench/")
# "path::function" → why it may be longer for now. Each entry is a debt with an owner, not a licence.
FUNCTION_ALLOW_LIST: dict[str, str] = {}


def _python_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return sorted(path for path in listed if not path.startswith(EXEMPT_PREFIXES) and (ROOT / path).is_file())


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.end_lineno - node.lineno + 1


def test_no_module_is_over_600_lines():
    too_long = []
    for path in _python_files():
        lines = len((ROOT / path).read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path}: {lines} lines")
    assert not too_long, (f"modules over {MAX_MODULE_LINES} lines; split them by what they own: "
                          + "; ".join(too_long))


def test_no_function_is_over_100_lines():
    too_long, allowed_seen = [], set()
    for path in _python_files():
        for node, lines in _functions(ast.parse((ROOT / path).read_text(), filename=path)):
            key = f"{path}::{node.name}"
            if lines <= MAX_FUNCTION_LINES:
                continue
            if key in FUNCTION_ALLOW_LIST:
                allowed_seen.add(key)
                continue
            too_long.append(f"{path}:{node.lineno} {node.name}() is {lines} lines")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(too_long)
    stale = set(FUNCTION_ALLOW_LIST) - allowed_seen
    assert not stale, f"allow-list entries no longer needed (remove them from FUNCTION_ALLOW_LIST): {sorted(stale)}"


def _root_modules() -> set[str]:
    """The project's importable top-level names: root .py files and root folders with __init__.py."""
    names = set()
    for path in _python_files():
        parts = path.split("/")
        if len(parts) == 1:
            names.add(parts[0].removesuffix(".py"))
        elif parts[1] == "__init__.py" and len(parts) == 2:
            names.add(parts[0])
    return names


def test_every_root_module_is_under_the_layering_contracts():
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    listed = set(config["importlinter"]["root_packages"].split())
    missing = _root_modules() - listed
    assert not missing, (f"{sorted(missing)} are not in .importlinter's root_packages, so lint-imports does "
                         "not check them: add each there and to the layers contract where it belongs")
    gone = listed - _root_modules()
    assert not gone, f".importlinter names modules that no longer exist: {sorted(gone)}"


def test_the_readme_layout_names_every_root_module_and_folder():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", layout, re.S).group(1)
    named = {line.split()[0].rstrip("/").removesuffix(".py") for line in block.splitlines()
             if line and not line[0].isspace()}
    folders = {path.split("/")[0] for path in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        if "/" in path and not path.startswith(".")}
    missing = (_root_modules() | folders) - named
    assert not missing, f"README.md's layout section does not name {sorted(missing)}: add a line for each"


def test_the_image_copies_every_root_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY\s+([A-Za-z_]+)/\s", dockerfile, re.M))
    packages = {name for name in _root_modules() if (ROOT / name / "__init__.py").is_file()}
    missing = packages - copied
    assert not missing, (f"the Dockerfile does not copy {sorted(missing)}: the worker would fail to import "
                         "them on RunPod; add a COPY line for each")
    assert re.search(r"^COPY \*\.py \./", dockerfile, re.M), "the Dockerfile must copy the root modules"
