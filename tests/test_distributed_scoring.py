"""Scores across processes: with a torch.distributed process group, `sum_over_views` shares the views out over
the ranks and all-reduces the totals. Two CPU processes (gloo, file:// rendezvous) must return what one process
returns: Fisher blocks, leave-one-out importance and LightGaussian's significance, on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# One pytest-xdist worker runs this module: its module-scoped fixtures are made once.
pytestmark = pytest.mark.xdist_group("distributed-scoring")

WORLD_SIZE = 2
N_VIEWS = 5

# The scene and the scores, as one process computes them; the workers run the same code under a process group.
SCENE_AND_SCORES = textwrap.dedent("""
    import torch
    from nerfstudio_pruning.render import rasterization
    from nerfstudio_pruning.scoring.accumulate import sum_over_views
    from nerfstudio_pruning.scoring.baselines import lightgaussian_significance
    from nerfstudio_pruning.scoring.fisher import fisher_blocks
    from nerfstudio_pruning.scoring.importance import leave_one_out_importance
    from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians
    from nerfstudio_pruning.types import Views

    def scores(n_views):
        torch.set_num_threads(1)
        g = random_gaussians(40, sh_degree=1, extent=0.5, scale=0.12, seed=0, dtype=torch.float64)
        g.opacity_logits = g.opacity_logits + 1.0
        viewmats, Ks = orbit_cameras(n_views, 24, 20, radius=2.0)
        viewmats, Ks = viewmats.double(), Ks.double()
        background = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
        views = Views(viewmats, Ks, 24, 20, background)
        target = random_gaussians(40, sh_degree=1, extent=0.5, scale=0.12, seed=5, dtype=torch.float64)
        gt, _, _ = rasterization(**target.render_args(), viewmats=viewmats, Ks=Ks, width=24, height=20, sh_degree=1,
                                 backgrounds=background[None].expand(n_views, -1))
        gaussians = g.as_gaussians(1)
        seen = []

        def record(index, view):
            seen.append(index)
            return torch.full((3,), float(index + 1), dtype=torch.float64)

        return {
            "fisher": fisher_blocks(gaussians, views, progress=False),
            "loo_l1": leave_one_out_importance(gaussians, views, gt_images=gt, loss="l1", progress=False),
            "loo_energy": leave_one_out_importance(gaussians, views, loss="energy", progress=False),
            "lightgaussian": lightgaussian_significance(gaussians, views),
            # initial value 10: counted once however many ranks there are
            "view_sum": sum_over_views(views, record, torch.full((3,), 10.0, dtype=torch.float64)),
            "views_seen": torch.tensor(seen),
        }
""")

WORKER = SCENE_AND_SCORES + textwrap.dedent("""
    import sys
    import torch.distributed as dist

    rank, world_size, rendezvous, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        torch.save(scores(int(sys.argv[5])), out)
    finally:
        dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def single_process():
    namespace = {}
    exec(compile(SCENE_AND_SCORES, "scene_and_scores", "exec"), namespace)  # noqa: S102 - our own code above
    return namespace["scores"](N_VIEWS)


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    script = folder / "worker.py"
    script.write_text(WORKER)
    rendezvous = folder / "rendezvous"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(WORLD_SIZE), str(rendezvous),
                          str(folder / f"rank{rank}.pt"), str(N_VIEWS)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
        for rank in range(WORLD_SIZE)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, output[-3000:]
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_views_are_shared_out_and_the_total_is_everyones(per_rank, single_process):
    assert single_process["views_seen"].tolist() == list(range(N_VIEWS))
    assert per_rank[0]["views_seen"].tolist() == [0, 2, 4] and per_rank[1]["views_seen"].tolist() == [1, 3]
    expected = 10.0 + sum(range(1, N_VIEWS + 1))
    for rank in per_rank:
        assert rank["view_sum"].tolist() == [expected] * 3


@pytest.mark.parametrize("score", ["fisher", "loo_l1", "loo_energy", "lightgaussian"])
def test_scores_of_two_processes_equal_one_process(per_rank, single_process, score):
    reference = single_process[score]
    assert reference.abs().sum() > 0
    for rank in per_rank:
        # Only the order of the float64 additions over views differs.
        assert torch.allclose(rank[score], reference, rtol=1e-12, atol=1e-15 * float(reference.abs().max()))
    assert torch.equal(per_rank[0][score], per_rank[1][score])  # every rank holds the same total
