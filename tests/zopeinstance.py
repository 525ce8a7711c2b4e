"""A Zope instance started from a zope.conf by Zope's own loader, run as
``python zopeinstance.py ZOPE_CONF ACTION [HEX]`` by tests/test_zope.py.

``configure_wsgi`` reads zope.conf with Zope's schema (as ``runwsgi`` and
``zconsole`` do), and ``Zope2.app()`` opens the ``<zodb_db main>`` database
and starts Zope on it. The actions print one JSON line:

- ``write HEX``: store a Blob with those bytes in the ZODB root;
- ``read``: that blob's bytes;
- ``demo HEX``: as a Plone test layer does (plone.testing's
  ``stackDemoStorage``), stack a DemoStorage on the database, read the blob
  through it, and commit a new blob with those bytes into the layer.
"""

from __future__ import annotations

import json
import sys

import transaction
import ZODB
import Zope2
from ZODB.blob import Blob
from ZODB.DemoStorage import DemoStorage
from Zope2.Startup.run import configure_wsgi

from zodb_s3blobs import S3BlobStorage

NAME = "zope-blob"


def read_blob(db: ZODB.DB, name: str) -> bytes:
    """The content of the blob root[name] of *db*."""
    conn = db.open()
    with conn.root()[name].open() as f:
        data = f.read()
    conn.close()
    return data


def main(config: str, action: str, data: str = "") -> dict:
    """Start Zope from *config* and do *action*; return what to print."""
    configure_wsgi(config)
    app = Zope2.app()  # starts Zope on the configured database
    db = app._p_jar.db()
    result = {"storage": type(db.storage).__name__, "application": app.getId()}
    assert isinstance(db.storage, S3BlobStorage), db.storage
    if action == "write":
        app._p_jar.root()[NAME] = Blob(bytes.fromhex(data))
        transaction.commit()
    elif action == "read":
        result["data"] = read_blob(db, NAME).hex()
    elif action == "demo":
        layer = ZODB.DB(DemoStorage(name="test layer", base=db.storage))
        result["base_data"] = read_blob(layer, NAME).hex()
        conn = layer.open()
        conn.root()["layer-blob"] = Blob(bytes.fromhex(data))
        transaction.commit()
        conn.close()
        result["layer_data"] = read_blob(layer, "layer-blob").hex()
        layer.close()
    app._p_jar.close()
    return result


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
