"""Private inference of MPCFormer models under SecretFlow SPU.

* ``run(model, batch, protocol=...)``: the research entry point, one private forward in this
  process (or through a local service), with logits, a CostReport and the plaintext gap.
* ``Service`` / ``spu_run serve``: a long-lived service: nodes, weights shared once, every
  bucket compiled once, mutual TLS everywhere (service.py, roles/, transport.py, tunnel.py).
* ``Client`` / ``spu_run query``: the client of a service (roles/client.py).

Layers, top down (arrows point down only): cli -> service / api -> roles (node, owner,
client) -> compile (jax) / runtime (jax-free: node processes import nothing with jax) ->
models, approx. Configs live in ``spu_configs/`` and are validated by ``load_config``.
Names are imported lazily so that node processes stay light.
"""

import importlib

_EXPORTS = {"run": "api", "PrivateResult": "api", "ClusterConfig": "config",
            "ConfigError": "config", "load_config": "config", "CostReport": "cost",
            "Client": "roles.client", "QueryError": "roles.client", "Service": "service",
            "make_certs": "tls"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"mpcformer_jax.private.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'mpcformer_jax.private' has no attribute {name!r}")
