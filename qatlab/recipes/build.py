"""build_recipe: a Recipe from the composed config (method + quantizer + init + loss + stages groups)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from qatlab.errors import QatlabError, require
from qatlab.recipes.recipe import Recipe

CONF_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")
METHOD_KEYS = ("name", "weight", "activation", "kv", "include", "exclude", "weight_overrides")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))


def build_recipe(cfg: DictConfig) -> Recipe:
    method = OmegaConf.to_container(cfg.method, resolve=True)
    require(isinstance(method, dict) and method.get("name"), "method must name a recipe (method=<name>, conf/method/)")
    check_name(method["name"])
    unknown = sorted(set(method) - set(METHOD_KEYS))
    require(not unknown, f"method: unknown key(s) {unknown}; a method holds {list(METHOD_KEYS)} (the quantizer, init, "
                         "loss and stages are their own groups: quantizer=..., init.<key>=..., loss.<key>=..., "
                         "stages.<name>.<key>=...)")
    stages = []
    for key, stage_cfg in (cfg.get("stages") or {}).items():
        stage = _instantiate(stage_cfg, f"stages.{key}")
        stage.name = key
        stages.append(stage)
    return Recipe(
        **method,
        quantizer=_instantiate(cfg.quantizer, "quantizer"),
        init=_instantiate(cfg.init, "init") if cfg.get("init") else None,
        loss=_instantiate(cfg.loss, "loss") if cfg.get("loss") else None,
        stages=stages,
    )


def check_name(name: str) -> None:
    """method.name is the recipe that was composed, never a free label: `method.name=bitdistiller` on top of the
    kd recipe would otherwise run kd under BitDistiller's name."""
    require(name in recipe_names(), f"method.name='{name}' is not a recipe; pick one with method=<name> "
                                    f"(conf/method/: {', '.join(recipe_names())})")
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices.get("method")
        require(chosen in (None, name), f"method.name='{name}' but the composed recipe is method={chosen}; "
                                        f"choose the recipe with method={name} instead of renaming it")


def _instantiate(node: DictConfig, key: str) -> Any:
    """hydra.utils.instantiate, with a constructor's error as one line naming the group."""
    require(isinstance(node, DictConfig) and "_target_" in node,
            f"{key} must be a config with a _target_ (pick one of conf/{key.split('.')[0].rstrip('s')}/)"
            + ("; to skip a stage set " + key + ".enabled=false" if key.startswith("stages.") else ""))
    try:
        built = hydra.utils.instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, QatlabError):
            raise QatlabError(str(cause).replace("stages.<name>", key)) from None
        reason = str(cause or e).splitlines()[0]
        raise QatlabError(f"{key} ({node._target_}): {reason}") from None
    if isinstance(built, functools.partial):  # a factory: its options are checked now, not at the first layer
        accepted = set(inspect.signature(built.func).parameters)
        unknown = sorted(set(built.keywords) - accepted)
        require(not unknown, f"{key} ({node._target_}) has no option(s) {unknown}; its options are "
                             f"{sorted(accepted - {'spec', 'weight'})}")
    return built


def compose_recipe(method: str = "kd", overrides: Sequence[str] = ()) -> Recipe:
    """The recipe `python -m qatlab method=<method> <overrides>` builds, from conf/ (notebooks, tests, benchmarks).

        compose_recipe("bitdistiller", ["quantizer=lsq", "method.weight.bits=3"])
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"method={method}", "paths.output_dir=.", *overrides])
    return build_recipe(cfg)
