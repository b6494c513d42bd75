"""ar_jax: autoregressive sequence models in JAX/Flax. Importing it changes nothing in the
process; the entry points set the platform defaults (ar_jax/platform.py)."""
