"""The object key layout, byte-compatible with earlier zodb-s3blobs buckets."""

import pytest
from ZODB.utils import p64

from zodb_s3blobs.keys import KeyLayout, validate_prefix


def test_keys_are_lower_case_hex_without_leading_zeros():
    layout = KeyLayout("")
    assert layout.key(p64(0), p64(0x3B5E2A1F0C00DD)) == "blobs/0/3b5e2a1f0c00dd.blob"
    assert layout.key(p64(0x1A), p64(1)) == "blobs/1a/1.blob"


def test_prefix_is_a_folder_above_blobs():
    assert KeyLayout("site/a/").key(p64(7), p64(9)) == "site/a/blobs/7/9.blob"


@pytest.mark.parametrize("oid, tid", [(0, 0), (1, 2), (0xFFFFFFFFFFFFFFFF, 0x3B5E)])
def test_parse_inverts_key(oid, tid):
    layout = KeyLayout("p")
    assert layout.parse(layout.key(p64(oid), p64(tid))) == (p64(oid), p64(tid))


@pytest.mark.parametrize(
    "key",
    [
        "p/blobs/01/2.blob",  # leading zero: not a key we write
        "p/blobs/1/02.blob",
        "p/blobs/A/2.blob",  # upper case
        "p/blobs/1/2.blob.tmp",
        "p/blobs/1/x/2.blob",
        "p/blobs/1/2",
        "p/other/1/2.blob",
        "q/blobs/1/2.blob",
        "p/blobs/11111111111111111/2.blob",  # more than 64 bits
    ],
)
def test_parse_rejects_foreign_keys(key):
    assert KeyLayout("p").parse(key) is None


@pytest.mark.parametrize("bad", ["/x", "a/../b", "./a", "a//b", "a b", "a\\b", "é"])
def test_bad_prefixes_are_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match="s3-prefix"):
        validate_prefix(bad)


@pytest.mark.parametrize("prefix", ["", "site", "site/staging", "staging"])
def test_only_keys_made_as_staging_keys_are_staging_keys(prefix):
    layout = KeyLayout(prefix)
    made = layout.staging_key()
    assert layout.is_staging_key(made)
    root = layout.staging_root
    for other in [
        root + "index.html",
        root + "A" * 32 + ".blob",  # upper-case hex
        root + "a" * 31 + ".blob",
        root + "a" * 33 + ".blob",
        root + "blobs/1/2.blob",  # another database's prefix .../staging
        root + "staging/" + "a" * 32 + ".blob",
        made.replace(root, "elsewhere/"),
    ]:
        assert not layout.is_staging_key(other), other
