"""The option files of conf/: each composes into a valid config, and each sets only what differs from the
structured config's defaults (hybridlm/config.py and the dataclasses it names), so every default has one home."""
import pytest
from helpers import CONF
from omegaconf import OmegaConf

from hybridlm.config import Config, to_config

GROUPS = ["model", "model/attention", "data", "intervention", "adapter", "backend", "trainer", "optim", "logger",
          "checkpoint", "eval"]
OPTIONS = [f"{g}={p.stem}" for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
# Values an option leaves to the command line (`???`) or needs from another group, given here so the composed
# config can validate.
MISSING = {"data=files": ["data.paths=[corpus/*.txt]"], "data=hub": ["data.hub_name=pg19"],
           # the paper's chunk sizes {128, 256} need rows longer than the default 256 to retrieve anything
           "model/attention=se_attn": ["data.seq_len=1024"]}
# The keys naming what an option of the group selects: stated even where they equal the default (data=stdlib).
SELECTORS = {"data": ("source", "synthetic.task"), "intervention": ("name",), "adapter": ("name",),
             "backend": ("name",), "model/attention": ("kind",)}
# A chosen model file lists the architecture keys that override a checkpoint's (runner.explicit_model_keys), so
# its keys are meant to be there whatever the defaults are.
LISTS_ITS_KEYS = ("model", "model/attention")


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _key(group: str) -> str:
    return "model.attn" if group == "model/attention" else group


def test_every_group_has_options():
    assert {o.split("=")[0] for o in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_group_option_composes_and_validates(option, compose_config):
    cfg = OmegaConf.structured(to_config(compose_config("train", [option, *MISSING.get(option, [])])))
    group, _, name = option.partition("=")
    selected = _leaves(OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml")))
    for key in set(SELECTORS.get(group, ())) & set(selected):  # the option selects what it says
        assert OmegaConf.select(cfg, f"{_key(group)}.{key}") == selected[key]


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.split("=")[0] not in LISTS_ITS_KEYS])
def test_an_option_file_sets_only_what_differs_from_the_defaults(option):
    group, _, name = option.partition("=")
    values = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))
    values.pop("defaults", None)
    defaults = _leaves(OmegaConf.to_container(OmegaConf.structured(Config))[_key(group)])
    restated = sorted(k for k, v in _leaves(values).items() if k not in SELECTORS.get(group, ()) and v == defaults[k])
    assert not restated, f"conf/{group}/{name}.yaml restates the default of {restated}: drop it"
