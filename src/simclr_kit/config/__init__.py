"""The configs: frozen, validated dataclasses for pretraining (:mod:`~simclr_kit.config.pretrain`),
data and augmentation (:mod:`~simclr_kit.config.data`), evaluation and the downstream classifier
(:mod:`~simclr_kit.config.evaluate`), and the optimizers' defaults
(:mod:`~simclr_kit.config.optimizers`); every name is importable from here.

Each field is declared once: its type, its default and (with
:func:`~simclr_kit.config.fields.setting`) what it means, with its units, its flag, whether a
resume may change it and whether a recipe pins it. The command-line flags are derived from these
declarations (:mod:`simclr_kit.cli.flags`), and YAML files and recipes are read into them by
:mod:`simclr_kit.config.fields`. Every value is range-checked in ``__post_init__`` so that a bad
one fails with one line naming the field and its allowed range before any data is read. Whether
the machine can serve a value (a backbone that torchvision or timm knows, a logger's library) is
checked where the run is set up (:func:`simclr_kit.train.prepare.prepare`), not here: this
package depends on nothing above it.
"""

from __future__ import annotations

from simclr_kit.config.data import AugmentConfig, DataConfig, layered_data
from simclr_kit.config.evaluate import ClassifierConfig, EvalConfig
from simclr_kit.config.fields import (ConfigError, config_source, flag_name, flatten, from_dict,
                                      load_yaml, marked, merge, normalize_keys, recipe,
                                      recipe_names, setting, to_dict, to_yaml, unflagged,
                                      unknown_choice)
from simclr_kit.config.optimizers import (LR_SCALINGS, OPTIMIZER_DEFAULTS, OPTIMIZERS, VIT_DEFAULTS,
                                          VIT_OPTIMIZER, OptimizerDefaults, is_vit_name,
                                          merge_pretrain)
from simclr_kit.config.pretrain import (BACKBONE_INITS, CheckConfig, PretrainConfig, data_recipe,
                                        with_data_recipe)

__all__ = ["AugmentConfig", "BACKBONE_INITS", "CheckConfig", "ClassifierConfig", "ConfigError",
           "DataConfig", "EvalConfig", "LR_SCALINGS", "OPTIMIZERS", "OPTIMIZER_DEFAULTS",
           "OptimizerDefaults", "PretrainConfig", "VIT_DEFAULTS", "VIT_OPTIMIZER",
           "config_source", "data_recipe", "flag_name", "flatten", "from_dict", "is_vit_name",
           "layered_data", "load_yaml", "marked", "merge", "merge_pretrain", "normalize_keys",
           "recipe", "recipe_names", "setting", "to_dict", "to_yaml", "unflagged",
           "unknown_choice", "with_data_recipe"]
