"""Log masking: long secrets are masked everywhere, short values nowhere, and a
malformed log call anywhere in the process still logs instead of raising."""

from __future__ import annotations

import logging

from zodb_s3blobs.redact import MASK, MIN_SECRET_LENGTH, protect


def test_a_real_length_secret_is_masked_and_a_short_value_is_not(caplog):
    """Fails before the fix: a one-letter secret was replaced in every record,
    so tracebacks read '***' wherever an 's' was."""
    secret = "x" * MIN_SECRET_LENGTH
    protect("s", secret)
    with caplog.at_level(logging.INFO):
        logging.getLogger("zodb_s3blobs.test").info("key %s in a message", secret)
        logging.getLogger("zodb_s3blobs.test").info("this stays readable")
    assert [r.getMessage() for r in caplog.records] == [
        f"key {MASK} in a message",
        "this stays readable",
    ]


def test_a_malformed_log_call_is_reported_not_raised(capsys):
    """Fails before the fix: the record factory formatted the message itself,
    so an add-on's `log.warning("%s %s", 1)` raised TypeError into its caller
    instead of printing logging's '--- Logging error ---'."""
    protect("a-secret-value")
    logger = logging.getLogger("zodb_s3blobs.test.malformed")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    logger.propagate = False  # pytest's capture handlers re-raise such errors
    try:
        logger.warning("%s %s", 1)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert "--- Logging error ---" in capsys.readouterr().err
