"""Per-Gaussian pruning scores as plain tensor code: per-pair statistics of a view's composite, PUP's Fisher
blocks, Speedy-Splat's score, VEDAL's leave-one-out importance and the baseline scores, all summed over views by
one loop (`accumulate.py`). Depends on `nerfstudio_pruning.render` only; nothing here imports nerfstudio.
"""
