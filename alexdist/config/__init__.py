"""Typed recipes: the schema (schema.py: the recipe and its training sections; run_settings.py: how a run runs
and what it records; base.py: what every section shares), reading a recipe with overrides (loading.py), the
shipped recipes (recipes.py). Free of torch: the launcher-side tools and `alexdist config` read recipes without
it (only naming a model of the registry imports the models, to check the name)."""

from alexdist.config.loading import dump_yaml, flatten, load_recipe, parse_overrides, sweep_output_dir
from alexdist.config.recipes import RECIPES_DIR, find_recipe, recipe_summary, shipped_recipes
from alexdist.config.run_settings import (
    TRACKERS,
    CheckpointConfig,
    DeepSpeedConfig,
    DistributedConfig,
    EvalConfig,
    SpeedConfig,
    TrackingConfig,
)
from alexdist.config.schema import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "RECIPES_DIR", "TRACKERS", "AugmentConfig", "CheckpointConfig", "DataConfig", "DeepSpeedConfig",
    "DistributedConfig", "EvalConfig",
    "ModelConfig", "OptimConfig", "Recipe", "ScheduleConfig", "SpeedConfig", "TrackingConfig", "TrainConfig",
    "dump_yaml", "find_recipe", "flatten", "load_recipe", "parse_overrides", "recipe_summary", "shipped_recipes",
    "sweep_output_dir",
]
