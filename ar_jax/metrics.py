"""Conversions between the ways a language model's loss is reported."""

import math

LN2 = math.log(2.0)


def perplexity(nats_per_token: float) -> float:
  """exp of the mean negative log-likelihood per token."""
  return math.exp(nats_per_token) if nats_per_token < 700 else math.inf


def bits_per_unit(total_nats: float, units: float) -> float:
  """Total negative log-likelihood in nats -> bits per unit (token, character, byte, dimension)."""
  return total_nats / LN2 / units
