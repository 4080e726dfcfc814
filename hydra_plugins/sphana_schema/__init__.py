"""Hydra discovers this module (hydra_plugins namespace) before composing, so the typed schema
is in the ConfigStore whoever composes ``conf/``: ``sphana params`` or DVC on ``dvc exp run``."""

from sphana.config import register_configs

register_configs()
