"""``python -m zodb_s3blobs.cli``: the ``zodb-s3blobs`` command."""

import sys

from . import main

sys.exit(main())
