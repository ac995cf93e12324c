"""Private inference of MPCFormer models under SecretFlow SPU.

``run(model, batch, protocol=...)`` runs one private forward in this process (or over local
node processes) and returns logits and a CostReport; ``spu_run`` (cli.py) runs the roles of a
cluster (nodes, model owner, client) as separate processes or hosts. Configs live in
``spu_configs/`` and are validated by ``load_config``.

Names are imported lazily so that node processes, which need SPU but not jax, stay light.
"""

import importlib

_EXPORTS = {"run": "api", "PrivateResult": "api", "ClusterConfig": "config",
            "ConfigError": "config", "load_config": "config", "CostReport": "cost"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"mpcformer_jax.private.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'mpcformer_jax.private' has no attribute {name!r}")
