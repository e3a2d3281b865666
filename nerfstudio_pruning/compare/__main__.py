from nerfstudio_pruning.compare.cli import entrypoint

entrypoint()
