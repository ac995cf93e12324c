"""Private inference of MPCFormer models under SecretFlow SPU.

``run(model, batch, protocol=...)`` runs one private forward in this process (or over local
node processes) and returns logits and a CostReport; ``spu_run`` (cli.py) runs the roles of a
cluster (nodes, model owner, client) as separate processes or hosts. Configs live in
``spu_configs/`` and are validated by ``load_config``.
"""

from mpcformer_jax.private.api import PrivateResult, run
from mpcformer_jax.private.config import ClusterConfig, ConfigError, load_config
from mpcformer_jax.private.cost import CostReport

__all__ = ["ClusterConfig", "ConfigError", "CostReport", "PrivateResult", "load_config", "run"]
