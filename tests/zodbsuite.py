"""Run ZODB's unittest/doctest suites as pytest items, honouring their layers."""

from __future__ import annotations

import os
import unittest

import pytest


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
