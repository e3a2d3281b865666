"""GPU-kit shim for viser 0.2.7 (nerfstudio's web viewer; ~10 MB with its dependencies websockets, msgpack,
nodeenv, trimesh, imageio, ...). nerfstudio imports it at module level in the trainer (the viewer), in
scene_box.py (viser.transforms, for oriented crop boxes) and in the legacy viewer; the kit trains with
`--vis tensorboard`, which starts no viewer, and exports without a crop box. Submodules `transforms`,
`theme` and `infra` are shims too. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("viser", "the kit runs without the viewer (--vis tensorboard) and without crop boxes")
