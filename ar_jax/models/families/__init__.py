"""The model families: one module each, found by ar_jax.models.available()."""
