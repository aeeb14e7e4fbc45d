"""Typed recipes: the schema (schema.py), reading a recipe with overrides (loading.py), the shipped recipes
(recipes.py). Free of torch: the launcher-side tools and `alexdist config` read recipes without it."""

from alexdist.config.loading import dump_yaml, flatten, load_recipe, parse_overrides
from alexdist.config.recipes import RECIPES_DIR, find_recipe, recipe_summary, shipped_recipes
from alexdist.config.schema import (
    TRACKERS,
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    ScheduleConfig,
    SpeedConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "RECIPES_DIR", "TRACKERS", "AugmentConfig", "CheckpointConfig", "DataConfig", "DistributedConfig", "EvalConfig",
    "ModelConfig", "OptimConfig", "Recipe", "ScheduleConfig", "SpeedConfig", "TrackingConfig", "TrainConfig",
    "dump_yaml", "find_recipe", "flatten", "load_recipe", "parse_overrides", "recipe_summary", "shipped_recipes",
]
