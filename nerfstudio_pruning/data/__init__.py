"""Scenes and dataparsers: the built-in default scene (generated, no download) and a caching nerfstudio-data."""
