"""The suite's own scheduling: under pytest-xdist's `--dist loadgroup` (scripts/run.sh test) the tests of one
`xdist_group` run on one worker, one after another in their order, which conftest.py's long groups rely on (their
module fixtures are made once, and the long runs start first). pytest 9.2 with pytest-xdist 3.8 silently stopped
grouping (pytest-xdist issue 1386: xdist tags a group through the node id, which pytest 9.2 no longer reads from
where xdist writes it): the groups' module fixtures were made on both workers; pyproject.toml keeps pytest below 9.2 for that. These tests
fail if the groups are split again: each must find that the group's first ran before it, on its worker (split,
they may still land together by chance: four of them make that unlikely)."""

from __future__ import annotations

import os
import time

import pytest
from conftest import folder_all_workers_see

GROUP = "scheduling-probe"


@pytest.fixture
def record(tmp_path_factory):
    """A file every worker of this session sees."""
    shared = folder_all_workers_see(tmp_path_factory)
    if shared is None:
        pytest.skip("not under pytest-xdist")
    return shared / f"{GROUP}.worker"


@pytest.mark.xdist_group(GROUP)
def test_the_first_of_a_group_notes_its_worker(record):
    record.write_text(os.environ["PYTEST_XDIST_WORKER"])
    time.sleep(1.0)  # split, the other worker would take the group's next tests meanwhile


@pytest.mark.xdist_group(GROUP)
@pytest.mark.parametrize("position", [2, 3, 4])
def test_the_others_of_the_group_run_after_it_on_the_same_worker(record, position):
    assert record.exists(), f"the group's test {position} ran before its first: the group was split"
    assert record.read_text() == os.environ["PYTEST_XDIST_WORKER"], (
        f"the group's tests 1 and {position} ran on workers {record.read_text()} and "
        f"{os.environ['PYTEST_XDIST_WORKER']}: pytest {pytest.__version__} with this pytest-xdist does not keep an "
        "xdist_group on one worker")
