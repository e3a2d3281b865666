"""pup-gs and vedal-gs hold their settings as one object (`PupGSModelConfig.schedule`, `VedalGSModelConfig.vedal`)
and keep them flat on ns-train's command line: every setting is `--pipeline.model.<setting>` (the gate's
`--pipeline.model.gate.<setting>`) and parses into the held object, parsed as ns-train parses its method
subcommands. config.yml files written while the model configs inherited these settings still load."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import pytest
import tyro
import yaml

from nerfstudio_pruning.pup.schedule import PupScheduleConfig
from nerfstudio_pruning.vedal.controller import VedalConfig

# One value per setting, none of them the default (checked below); target_gaussians is exclusive with
# target_fraction and parsed on its own.
PUP_VALUES = {"prune_start_step": ("120", 120), "prune_fractions": ("0.5 0.4 0.3", (0.5, 0.4, 0.3)),
              "refine_steps": ("7 8 9", (7, 8, 9)), "min_gaussians": ("10", 10), "target_fraction": ("0.3", 0.3),
              "target_gaussians": ("500", 500)}
VEDAL_VALUES = {
    "finetune_start_step": ("10", 10), "hard_prune_step": ("20", 20), "kl_weight": ("2.5", 2.5),
    "kl_weight_units": ("loss", "loss"), "prior_keep_probability": ("0.3", 0.3), "sparsity_weight": ("0.002", 0.002),
    "initial_keep_probability": ("0.9", 0.9), "temperature_start": ("2.0", 2.0), "temperature_end": ("0.2", 0.2),
    "importance_every": ("5", 5), "importance_views": ("3", 3), "importance_downscale": ("2", 2),
    "importance_seed": ("7", 7), "use_gate": ("False", False), "min_gaussians": ("10", 10),
    "target_fraction": ("0.3", 0.3), "target_gaussians": ("500", 500), "target_contest": ("0.25", 0.25),
    "hard_mask_fraction": ("0.2", 0.2), "kl_at_target": ("True", True), "prior_at_target": ("False", False),
    "head_gradient_rows": ("64", 64),
    "gate.beta": ("0.8", 0.8), "gate.rel_tol": ("0.1", 0.1), "gate.window": ("4", 4), "gate.min_refreshes": ("5", 5),
    "gate.threshold_quantile": ("0.8", 0.8), "gate.max_eligible_fraction": ("0.7", 0.7),
    "gate.release_tol_factor": ("3.0", 3.0), "gate.sticky": ("False", False),
    "gate.cap_keeps_incumbents": ("False", False), "gate.rel_change_floor": ("0.02", 0.02),
}
# The model configs' own pruning settings, beside the held ones.
PUP_OWN_VALUES = {"score": ("speedy", "speedy"), "fisher_downscale": ("2", 2), "score_min_side": ("0", 0),
                  "n_probes": ("3", 3), "score_seed": ("5", 5)}


def settings(config) -> Dict[str, Any]:
    """Every setting of a settings dataclass by dotted name, nested dataclasses (the gate) expanded."""
    found = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found.update({f"{f.name}.{name}": v for name, v in settings(value).items()})
        else:
            found[f.name] = value
    return found


def flag(name: str) -> str:
    return "--pipeline.model." + name.replace("_", "-")


@pytest.fixture(scope="module")
def parse():
    """Parse arguments as `ns-train` does: our method configs as tyro subcommands, flags without conversion
    (nerfstudio.configs.method_configs.AnnotatedBaseConfigUnion, with only this plugin's methods)."""
    from nerfstudio_pruning.methods import registry

    methods = {"pup-gs": registry.pup_gs, "vedal-gs": registry.vedal_gs, "splatfacto-portable": registry.splatfacto_portable}
    union = tyro.conf.SuppressFixed[tyro.conf.FlagConversionOff[tyro.extras.subcommand_type_from_defaults(
        defaults={name: spec.config for name, spec in methods.items()},
        descriptions={name: spec.description for name, spec in methods.items()})]]
    return lambda *args: tyro.cli(union, args=list(args))


def check_flags(parse, method: str, held: str, values: Dict[str, tuple], default) -> None:
    assert set(values) == set(settings(default)), "a setting without a value here is not checked"
    for name, (_, expected) in values.items():
        assert settings(default)[name] != expected, f"{name}: the value to parse is the default"
    exclusive = {"target_gaussians"}
    for names in (set(values) - exclusive, exclusive):
        args = [a for name in sorted(names) for a in (flag(name), *values[name][0].split())]
        parsed = settings(getattr(parse(method, *args).pipeline.model, held))
        assert {name: parsed[name] for name in names} == {name: values[name][1] for name in names}
        untouched = set(values) - names - {"target_fraction", "hard_prune_step"}
        assert {name: parsed[name] for name in untouched} == {name: settings(default)[name] for name in untouched}


def test_every_pup_schedule_flag_parses_into_the_held_schedule(parse):
    check_flags(parse, "pup-gs", "schedule", PUP_VALUES, PupScheduleConfig())
    args = [a for name, (text, _) in PUP_OWN_VALUES.items() for a in (flag(name), *text.split())]
    model = parse("pup-gs", *args).pipeline.model
    assert {name: getattr(model, name) for name in PUP_OWN_VALUES} == {n: v for n, (_, v) in PUP_OWN_VALUES.items()}


def test_every_vedal_flag_parses_into_the_held_settings(parse):
    check_flags(parse, "vedal-gs", "vedal", VEDAL_VALUES, VedalConfig())


def test_the_held_settings_have_no_flags_of_their_own(parse):
    for method, prefixed in (("pup-gs", "--pipeline.model.schedule.prune-start-step"),
                             ("vedal-gs", "--pipeline.model.vedal.kl-weight"), ("vedal-gs", "--pipeline.model.vedal.gate.window")):
        with pytest.raises(SystemExit):
            parse(method, prefixed, "5")
    with pytest.raises(SystemExit):  # splatfacto-portable has no pruning settings
        parse("splatfacto-portable", "--pipeline.model.kl-weight", "2")


def test_the_held_settings_are_validated_when_parsed(parse, capsys):
    for method, args, message in (("pup-gs", ("--pipeline.model.prune-fractions", "0.5"), "differ in length"),
                                  ("vedal-gs", ("--pipeline.model.finetune-start-step", "40000"), "hard_prune_step")):
        with pytest.raises(SystemExit):
            parse(method, *args)
        assert message in capsys.readouterr().err


def _inheriting_form(text: str, held: str) -> str:
    """The config.yml `text` as runs wrote it while the model config inherited its settings: the items of the held
    object moved up into the model config's own mapping."""
    root = yaml.compose(text, Loader=yaml.Loader)
    model = next(v for k, v in next(v for k, v in root.value if k.value == "pipeline").value if k.value == "model")
    held_node = next(v for k, v in model.value if k.value == held)
    model.value = [(k, v) for k, v in model.value if k.value != held] + list(held_node.value)
    return yaml.serialize(root)


@pytest.mark.parametrize("method, held, changed", [
    ("pup-gs", "schedule", {"prune_start_step": 80, "refine_steps": (20, 20), "target_fraction": 0.2}),
    ("vedal-gs", "vedal", {"finetune_start_step": 80, "kl_weight": 3.0,
                           "gate": dataclasses.replace(VedalConfig().gate, window=2)}),
])
def test_a_config_yml_of_the_inheriting_configs_loads_with_its_settings(tmp_path, method, held, changed):
    from nerfstudio_pruning.methods import registry

    config = getattr(registry, method.replace("-", "_")).config
    model = dataclasses.replace(config.pipeline.model, **{held: dataclasses.replace(
        getattr(config.pipeline.model, held), **changed)})
    config = dataclasses.replace(config, pipeline=dataclasses.replace(config.pipeline, model=model))
    old = _inheriting_form(yaml.dump(config), held)
    path = tmp_path / "config.yml"
    path.write_text(old)
    assert f"\n    {held}:" not in old  # the model config's own items: pipeline.model at indent 4
    assert any(f"\n    {name}: 80" in old for name in ("prune_start_step", "finetune_start_step"))
    loaded = yaml.load(path.read_text(), Loader=yaml.Loader)  # as nerfstudio's eval_setup and --load-config read it
    assert loaded.pipeline.model == config.pipeline.model
    assert type(getattr(loaded.pipeline.model, held)) is type(getattr(config.pipeline.model, held))
    # Written again, it is in the holding form and reads back the same.
    assert yaml.load(yaml.dump(loaded), Loader=yaml.Loader).pipeline.model == config.pipeline.model
