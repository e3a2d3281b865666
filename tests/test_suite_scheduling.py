"""The suite's own scheduling: under pytest-xdist's `--dist loadgroup` (scripts/run.sh test) the tests of one
`xdist_group` run on one worker, one after another in their order, which conftest.py's long groups rely on (their
module fixtures are made once, and the long runs start first). pytest 9.2 with pytest-xdist 3.8 silently stopped
grouping (pytest-xdist issue 1386: xdist tags a group through the node id, which pytest 9.2 no longer reads from
where xdist writes it), and the suite took minutes longer; pyproject.toml keeps pytest below 9.2 for that. These two
tests fail if the groups are split again: the second must find that the first ran before it, on its worker."""

from __future__ import annotations

import os

import pytest

GROUP = "scheduling-probe"


@pytest.fixture
def record(tmp_path_factory):
    """A file every worker of this session sees (their temporary folders share a parent)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        pytest.skip("not under pytest-xdist")
    return tmp_path_factory.getbasetemp().parent / f"{GROUP}.worker"


@pytest.mark.xdist_group(GROUP)
def test_the_first_of_a_group_notes_its_worker(record):
    record.write_text(os.environ["PYTEST_XDIST_WORKER"])


@pytest.mark.xdist_group(GROUP)
def test_the_second_of_the_group_runs_after_it_on_the_same_worker(record):
    assert record.exists(), "the group's first test has not run before its second: the group was split"
    assert record.read_text() == os.environ["PYTEST_XDIST_WORKER"], (
        f"the group's tests ran on workers {record.read_text()} and {os.environ['PYTEST_XDIST_WORKER']}: "
        f"pytest {pytest.__version__} with this pytest-xdist does not keep an xdist_group on one worker")
