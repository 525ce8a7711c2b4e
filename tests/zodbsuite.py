"""Run ZODB's unittest/doctest suites as pytest items, honouring their layers."""

from __future__ import annotations

import os
import unittest

import pytest
from ZODB.tests.testblob import storage_reusable_suite


def flatten(suite, layer=None):
    """[(test, layer)] for every test in *suite*, with its innermost layer."""
    layer = getattr(suite, "layer", layer)
    if isinstance(suite, unittest.TestSuite):
        cases = []
        for test in suite:
            cases.extend(flatten(test, layer))
        return cases
    return [(suite, layer)]


def case_id(test) -> str:
    return test.id().replace("ZODB.tests.", "")


def run_case(test, layer, workdir) -> None:
    """Run one test in *workdir*, with its layer set up around it."""
    result = unittest.TestResult()
    here = os.getcwd()
    os.chdir(workdir)
    try:
        if layer is not None:
            layer.setUp()
        try:
            if layer is not None:
                layer.testSetUp()
            try:
                test.run(result)
            finally:
                if layer is not None:
                    layer.testTearDown()
        finally:
            if layer is not None:
                layer.tearDown()
    finally:
        os.chdir(here)
    problems = result.errors + result.failures
    if problems:
        pytest.fail("\n\n".join(text for _test, text in problems), pytrace=False)
    if result.skipped:
        pytest.skip(result.skipped[0][1])
    assert result.testsRun == 1


ROOT_ONLY_FAILURE = "open(blob.committed(), 'w')"


def without_kernel_permission_example(test):
    """As root, drop the one example that relies on the kernel refusing a write
    to a read-only file (root may write anyway, and would truncate the cached
    copy the later examples read). test_cache.py asserts the mode bits that
    make committed files read-only instead."""
    doctest_ = getattr(test, "_dt_test", None)
    if os.geteuid() != 0 or doctest_ is None:
        return test
    kept = [e for e in doctest_.examples if ROOT_ONLY_FAILURE not in e.source]
    if len(kept) != len(doctest_.examples):
        assert len(doctest_.examples) - len(kept) == 1
        doctest_.examples = kept
    return test


def blob_suite_cases(prefix: str, factory) -> list[tuple[object, object]]:
    """ZODB's reusable blob-storage suite over storages from *factory*
    (``factory(name, blob_dir)``), as (test, layer) pairs for pytest."""
    return [
        (without_kernel_permission_example(test), layer)
        for test, layer in flatten(
            storage_reusable_suite(
                prefix,
                factory,
                test_blob_storage_recovery=True,
                test_packing=True,
                test_undo=True,
            )
        )
    ]
