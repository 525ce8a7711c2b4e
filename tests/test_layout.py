"""The package's layout: the storage is the top-level modules, the operator
tools are the ``zodb_s3blobs.cli`` subpackage, and imports go one way only,
from the tools to the storage."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import zodb_s3blobs

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "zodb_s3blobs"
CORE_MODULES = sorted(PACKAGE.glob("*.py"))
TOOLS = "zodb_s3blobs.cli"


def imported_modules(source: str, package: str = "zodb_s3blobs") -> set[str]:
    """Every module *source*, a module of *package*, imports anywhere in it
    (functions and ``TYPE_CHECKING`` blocks too), relative imports resolved;
    for ``from X import name`` both ``X`` and ``X.name``, since the name may
    be a module."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            modules.add(base)
            modules.update(f"{base}.{alias.name}" for alias in node.names)
    return modules


def is_tool(module: str) -> bool:
    """Is *module* the tools' subpackage or one of its modules?"""
    return module == TOOLS or module.startswith(f"{TOOLS}.")


def test_the_core_modules_are_found():
    names = {path.stem for path in CORE_MODULES}
    assert {"__init__", "storage", "cache", "gc", "objectstore"} <= names
    assert (PACKAGE / "cli" / "__init__.py").is_file()


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda path: path.name)
def test_the_core_never_imports_the_tools(path):
    source = path.read_text(encoding="utf-8")
    tools = sorted(filter(is_tool, imported_modules(source)))
    assert not tools, f"{path.name} imports {', '.join(tools)}"


@pytest.mark.parametrize(
    "source",
    [
        "from .cli import main",
        "from . import cli",
        "from .cli.target import load_target",
        "import zodb_s3blobs.cli.output",
        "def later():\n    from zodb_s3blobs.cli import demo",
        "if TYPE_CHECKING:\n    from .cli.target import Target",
    ],
)
def test_the_check_sees_every_way_to_import_the_tools(source):
    assert any(map(is_tool, imported_modules(source))), source
    assert not any(map(is_tool, imported_modules("from .cache import BlobCache")))


def test_public_names():
    for name in zodb_s3blobs.__all__:
        assert getattr(zodb_s3blobs, name) is not None
    from zodb_s3blobs import S3BlobStorage, S3Settings

    assert S3BlobStorage.__module__ == "zodb_s3blobs.storage"
    assert S3Settings.__module__ == "zodb_s3blobs.settings"


def test_version_is_the_installed_distributions():
    assert zodb_s3blobs.__version__ == importlib.metadata.version("zodb-s3blobs")


def test_version_without_installed_metadata():
    """A source tree on sys.path but not installed still imports."""
    code = textwrap.dedent(
        """
        import importlib.metadata

        def version(name):
            raise importlib.metadata.PackageNotFoundError(name)

        importlib.metadata.version = version
        import zodb_s3blobs
        print(zodb_s3blobs.__version__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "0+unknown"


def test_the_console_script_is_the_cli_main():
    from zodb_s3blobs import cli

    (script,) = importlib.metadata.entry_points(
        group="console_scripts", name="zodb-s3blobs"
    )
    assert script.value == "zodb_s3blobs.cli:main"
    assert script.load() is cli.main
