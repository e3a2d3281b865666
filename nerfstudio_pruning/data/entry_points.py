"""The dataparser specifications nerfstudio's entry points load, through `plugin_guard`."""

from nerfstudio_pruning.plugin_guard import guarded_load

default_scene_dataparser = guarded_load("nerfstudio_pruning.data.dataparser", ("default_scene_dataparser",))[
    "default_scene_dataparser"
]
cached_nerfstudio_dataparser = guarded_load("nerfstudio_pruning.data.cached_dataparser", ("cached_nerfstudio_dataparser",))[
    "cached_nerfstudio_dataparser"
]
