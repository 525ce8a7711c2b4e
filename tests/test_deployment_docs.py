"""Every configuration file shown in docs/deployment.md is read without error
by the schema of the program that reads it: Zope's for a zope.conf, ZEO's
for a zeo.conf, zodbconvert's for a file with a source and a destination;
every CONFIG of docs/migration.md by the schema the commands read it with.
Reading runs every key's datatype, so a misspelt key or a bad value fails
here; nothing is opened."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import ZConfig
import ZEO
from relstorage.zodbconvert import schema_xml as zodbconvert_schema
from Zope2.Startup.options import ZopeWSGIOptions

DEPLOYMENT = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
BLOCK = re.compile(r"```text\n(.*?)```", re.DOTALL)


def config_blocks() -> list[str]:
    blocks = BLOCK.findall(DEPLOYMENT.read_text(encoding="utf-8"))
    assert len(blocks) >= 4, f"{DEPLOYMENT.name} lost its configuration examples"
    return blocks


def rooted(text: str, root: Path) -> str:
    """*text* with its /var/... paths under *root*, their directories made
    (some datatypes require the directory of a path to exist)."""

    def move(match: re.Match) -> str:
        path = root / match.group(0).lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    return re.sub(r"/var/\S+", move, text)


def read(text: str, tmp_path: Path):
    """Read *text* as the program it is written for reads it."""
    text = rooted(text, tmp_path)
    if "<zodb_db" in text:
        path = tmp_path / "zope.conf"
        path.write_text(f"instancehome {tmp_path}\n{text}")
        return ZopeWSGIOptions(str(path))().configroot
    if "<zeo>" in text:
        schema = ZConfig.loadSchema(str(Path(ZEO.__file__).parent / "schema.xml"))
    elif " source>" in text:
        schema = ZConfig.loadSchemaFile(io.StringIO(zodbconvert_schema))
    else:
        raise AssertionError(f"no program reads this example:\n{text}")
    return ZConfig.loadConfigFile(schema, io.StringIO(text))[0]


@pytest.mark.parametrize("text", config_blocks())
def test_the_example_is_read_by_its_program(text, tmp_path):
    assert read(text, tmp_path) is not None


MIGRATION = DEPLOYMENT.with_name("migration.md")


def migration_sections() -> list[str]:
    blocks = BLOCK.findall(MIGRATION.read_text(encoding="utf-8"))
    sections = [block for block in blocks if "<s3blobstorage>" in block]
    assert len(sections) >= 2, f"{MIGRATION.name} lost its CONFIG examples"
    return sections


@pytest.mark.parametrize("text", migration_sections())
def test_the_migration_configs_are_read_on_their_own(text, tmp_path):
    """Each CONFIG docs/migration.md shows is read, as it stands, by the
    schema every zodb-s3blobs command reads CONFIG with.

    Fails before the fix: the FileStorage step 1 example lacked
    ``%import zodb_s3blobs``, and ZConfig did not know <s3blobstorage>."""
    import ZODB.config

    for directory in re.findall(r"fallback-blob-dir (\S+)", text):
        (tmp_path / directory.lstrip("/")).mkdir(parents=True)
    text = rooted(text, tmp_path)
    config, _ = ZConfig.loadConfigFile(
        ZODB.config.getStorageSchema(), io.StringIO(text)
    )
    assert type(config.storage).__name__ == "S3BlobStorageFactory"
