"""Sphinx configuration for the zodb-s3blobs documentation (MyST Markdown)."""

from importlib import metadata

project = "zodb-s3blobs"
author = "zodb-s3blobs contributors"
copyright = "zodb-s3blobs contributors"

try:
    release = metadata.version("zodb-s3blobs")
except metadata.PackageNotFoundError:  # a checkout that is not installed
    release = ""
version = release

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Anchors for headings down to level 3, so pages can link to sections.
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "zodb-s3blobs"
