"""Converters from other projects' checkpoints to zoo published folders (``python -m zoo.convert --help``).

* ``vmoe``: Google's official V-MoE checkpoints (``google-research/vmoe``), read with msgpack + numpy only.
"""

from zoo.convert.vmoe import PUBLISHED, config_from_checkpoint, config_from_official, convert_vmoe, map_vmoe_params
from zoo.convert.vmoe_checkpoint import VMoECheckpointError, read_checkpoint, read_vmoe_checkpoint

__all__ = ["convert_vmoe", "config_from_official", "config_from_checkpoint", "map_vmoe_params", "PUBLISHED",
           "read_checkpoint", "read_vmoe_checkpoint", "VMoECheckpointError"]
