"""nerfstudio's terminal progress ("step (percent)" and ETA) counting the steps of this run.

nerfstudio computes both as if every run started at step 0, so a post-hoc or resumed run showed e.g.
"30500 (305.00%)" and a meaningless ETA.
"""

from __future__ import annotations

import math

from nerfstudio.utils import writer


def show_progress_of_this_run(first_step: int, steps: int) -> None:
    """Make nerfstudio's terminal progress count the steps of this run, first_step .. first_step + steps - 1.

    nerfstudio prints "step (step / max_iter %)" and an ETA of (max_iter - step) x the mean step time, with
    max_iter = --max-num-iterations, i.e. as if every run started at step 0. The ETA becomes right with max_iter
    set to the run's end; the percentage of the printed line is computed from a max_iter that makes
    step / max_iter equal this run's fraction, (step - first_step) / steps, set for that one line only. A run
    from step 0 prints exactly what nerfstudio prints.
    """
    buffer = writer.GLOBAL_BUFFER
    if "max_iter" not in buffer:  # no local writer was set up (not the main process)
        return
    buffer["max_iter"] = first_step + steps
    for local_writer in writer.EVENT_WRITERS:
        if isinstance(local_writer, writer.LocalWriter):
            _print_this_runs_fraction(local_writer, first_step, steps)


def _print_this_runs_fraction(local_writer, first_step: int, steps: int) -> None:
    nerfstudio_print_stats = getattr(local_writer, "_nsp_nerfstudio_print_stats", local_writer._print_stats)

    def print_stats(latest_map, padding=" "):
        buffer = writer.GLOBAL_BUFFER
        step, end = buffer["step"], buffer["max_iter"]
        done = step - first_step
        buffer["max_iter"] = step * steps / done if done > 0 else math.inf  # step / max_iter = done / steps
        try:
            nerfstudio_print_stats(latest_map, padding)
        finally:
            buffer["max_iter"] = end

    local_writer._nsp_nerfstudio_print_stats = nerfstudio_print_stats
    local_writer._print_stats = print_stats
