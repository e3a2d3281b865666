"""The method specifications nerfstudio's entry points load, through `plugin_guard`."""

from nerfstudio_pruning.plugin_guard import guarded_load

# Importing the method configs makes nerfstudio discover dataparsers, which loads the dataparser entry points;
# those live in their own module so that this one is never needed half-initialised.
_methods = guarded_load("nerfstudio_pruning.methods.registry", ("splatfacto_portable", "pup_gs", "vedal_gs"))
splatfacto_portable = _methods["splatfacto_portable"]
pup_gs = _methods["pup_gs"]
vedal_gs = _methods["vedal_gs"]
