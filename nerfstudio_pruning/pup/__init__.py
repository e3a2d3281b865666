"""PUP 3D-GS's pruning schedule as a plain object (the score itself is `nerfstudio_pruning.scoring`)."""
