"""mpcformer_jax."""
