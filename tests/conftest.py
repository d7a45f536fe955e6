"""Fixtures shared by the test modules.

The suite writes checkpoints and exports of 40-170 MB. A test's own tmp_path goes when the test passes
(pyproject: tmp_path_retention_policy = "failed"), and the files a module's fixtures share go in
module_tmp_path, removed when the module ends, so a run holds one module's files at a time instead of
all of them (7 GB once filled CI's disk).
"""
import shutil

import pytest


@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory):
    """A directory for one test module's shared files, deleted after its last test."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)
