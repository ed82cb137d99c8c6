"""The registry of layer types: how each one reads, writes and drops channels.

One module per layer family registers its :class:`Shrinker` (``conv``, ``linear``, ``norm``, ``other``);
``base`` holds the protocol and the registry. To teach compactor a new layer type, write one shrinker
(see docs/ARCHITECTURE.md, "How to add a layer type"): nothing else needs to change.
"""

from . import conv, linear, norm, other  # noqa: F401  (each registers its shrinkers)
from .base import (
    PROTOCOL,
    Index,
    Role,
    Shrinker,
    Side,
    add_to_bias,
    inconsistency,
    new_like,
    own_forward,
    register,
    register_by_name,
    registered_types,
    role_of,
    shrinker_for,
    shrinker_of_type,
    take,
    width,
    zero_along,
)

__all__ = [
    "PROTOCOL",
    "Index",
    "Role",
    "Shrinker",
    "Side",
    "add_to_bias",
    "inconsistency",
    "new_like",
    "own_forward",
    "register",
    "register_by_name",
    "registered_types",
    "role_of",
    "shrinker_for",
    "shrinker_of_type",
    "take",
    "width",
    "zero_along",
]
