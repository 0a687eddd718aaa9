"""Recipes: a method = what is quantized + quantizer + init + loss + stages (conf/method/*.yaml)."""

from qatlab.recipes.build import build_recipe, compose_recipe
from qatlab.recipes.recipe import Recipe

__all__ = ["Recipe", "build_recipe", "compose_recipe"]
