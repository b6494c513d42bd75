"""ar_jax: autoregressive sequence models in JAX/Flax."""
