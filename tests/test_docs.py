"""The documentation builds without warnings, the configuration reference in
docs/configuration.md covers every key of component.xml, and the README stays
a landing page that links into docs/ rather than repeating them."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENT = ROOT / "src" / "zodb_s3blobs" / "component.xml"
README = ROOT / "README.md"
REFERENCES = [ROOT / "docs" / "configuration.md"]
#: A row of a reference table: | `key` | default | meaning |
ROW = re.compile(r"^\| `([a-z0-9-]+)` \|([^|]*)\|(.*)\|\s*$", re.MULTILINE)


def component_keys() -> list[ET.Element]:
    return list(ET.parse(COMPONENT).getroot().iter("key"))


def reference_rows(path: Path) -> dict[str, tuple[str, str]]:
    """key name -> (default cell, meaning cell) of the tables in *path*."""
    rows: dict[str, tuple[str, str]] = {}
    for name, default, meaning in ROW.findall(path.read_text(encoding="utf-8")):
        assert name not in rows, f"{path.name}: {name} is described twice"
        rows[name] = (default.strip(), meaning.strip())
    return rows


def test_docs_build_without_warnings(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(ROOT / "docs"),
            str(tmp_path / "html"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "configuration.html").exists()


def test_every_key_has_a_description():
    keys = component_keys()
    assert keys, f"no <key> elements found in {COMPONENT}"
    for key in keys:
        description = key.find("description")
        text = "" if description is None else (description.text or "").strip()
        assert text, f"component.xml: key {key.get('name')} has no <description>"


@pytest.mark.parametrize("path", REFERENCES, ids=lambda p: p.name)
def test_reference_lists_every_key(path):
    rows = reference_rows(path)
    for key in component_keys():
        name = key.get("name")
        assert name in rows, f"{path.name} does not describe the key {name}"
        default, meaning = rows[name]
        assert meaning, f"{path.name}: the key {name} has no meaning"
        if key.get("required") == "yes":
            assert default == "required", (
                f"{path.name}: {name} is required, but its default reads {default!r}"
            )
        elif key.get("default"):
            assert default == f"`{key.get('default')}`", (
                f"{path.name}: {name} defaults to {key.get('default')!r} in "
                f"component.xml, but its default reads {default!r}"
            )


@pytest.mark.parametrize("path", REFERENCES, ids=lambda p: p.name)
def test_reference_lists_no_unknown_key(path):
    known = {key.get("name") for key in component_keys()}
    unknown = sorted(set(reference_rows(path)) - known)
    assert not unknown, f"{path.name} describes keys component.xml lacks: {unknown}"


def test_readme_is_a_landing_page():
    """Under about 150 lines, no key reference table (that lives in
    docs/configuration.md), and every local link resolves."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert not reference_rows(README), "the key reference lives in docs/"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), f"README links to missing {target}"
