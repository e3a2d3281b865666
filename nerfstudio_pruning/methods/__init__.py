"""The nerfstudio layer: models, configs, trainer, pipeline and entry points that wire the algorithms into splatfacto."""
