"""The model contract: every member of a model family that training, decoding, sizing and
the studies read. Nothing outside a family's module knows which family it is.

A family is one module (ar_jax/models/families/NAME.py, whose NAME is config.model.name, or
a module of one's own named by its import path) that defines:

  Config        a frozen, keyword-only dataclass: the family's fields, which config.model
                sets; the fields the data decides (`vocab_size`; `eos_id` where the family
                uses it); and, inherited, the layer stack's (stack.StackConfig) and the
                numerics' (numerics.NumericsConfig). Its `__post_init__` names every bad
                value.
  Model         a Flax module, Model(config, deterministic=True), with the members of `Model`
                below. It builds its layers through the shared stack (ar_jax/models/stack.py),
                which scans them, rematerialises them and splits them over pipeline stages.
  RULES         its logical axis names -> mesh axes, read ahead of the shared rules
                (sharding.SHARED_RULES); see sharding.rules for how the table is resolved.
  TINY          named Config fields (without the data's) of models that build and run in
                seconds: the variants the contract tests (tests/test_contract.py) run, the
                first one also sharded. Each has several parameters of more than 1,024
                elements, so that a sharding test over them cannot pass vacuously.
  CAPABILITIES  a Capabilities: what the rest of the package would otherwise learn from the
                family's name.

Arrays are [B, T, ...] at the contract's boundary whatever a family uses inside; logits are
float32 whatever the compute dtype.
"""

import dataclasses
import types
from typing import Any, Protocol

import jax


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What training, data and studies read of a family besides its Model."""

  # The Config fields that set the family's size at a fixed depth, all to one value: what
  # the studies solve for to match families on parameters or FLOPs (experiments/sizing.py).
  # A field set to 0 stays 0 (off, or derived from the others).
  width: tuple[str, ...] = ('d_model',)
  # The Config field that sets how many blocks the layer stack holds.
  depth: str = 'num_layers'
  # Parameters that take no weight decay besides biases and norm scales, by name: those that
  # set a recurrence's decay rates or skip its state (decaying them toward 0 changes how long
  # the state remembers, not how large a weight is).
  no_decay: tuple[str, ...] = ()
  # Whether a row may pack several documents (segment ids keep them apart); False: every row
  # is one whole example (an image), and packed data is refused. (What a token is, a
  # character, a byte or a sub-pixel, is the data's to say: tokenizers declare their unit.)
  packs_documents: bool = True


class Model(Protocol):
  config: Any  # the family's Config
  deterministic: bool  # False: dropout on (training)

  # The most positions a sequence may have. 0: any length, and the cache has a fixed size,
  # so a run may carry it from one window to the next (stateful, truncated-BPTT training).
  max_len: int
  # The batch axis of every non-scalar array of the cache: decoding copies and reorders
  # rows (samples, beams) and gradient accumulation splits them along it.
  cache_batch_axis: int
  # Teacher forcing is itself a loop over time, so feeding the model its own samples one
  # step at a time (exact scheduled sampling) costs no more than teacher forcing.
  sequential: bool

  def __call__(
    self,
    tokens_BT: jax.Array,
    embeddings_BTE: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> jax.Array:
    """Teacher forcing: logits_BTV, where position t has seen tokens <= t only. Given
    embeddings_BTE (from `embed`), they replace the tokens' own: the gradient tests
    differentiate the logits with respect to them.

    segment_ids_BT (int32 [B, T], None: one document per row) packs several documents into
    a row. The ids do not decrease along T; the data counts the end-of-document tokens at or
    before t, so an eos starts the next document, as its BOS. Position t reads position
    s <= t only where segment_ids[b, s] == segment_ids[b, t], and positions restart at 0
    at each document's first token: a document's logits are those it gets alone at the
    start of a row. A family that cannot pack (whole images) raises ConfigError."""
    ...

  def embed(self, tokens_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """The float input vector of each position, [B, T, E]: what `__call__` reads of the
    tokens (given the same segment_ids_BT, which position encodings added here read), and
    the point the causality tests differentiate at."""
    ...

  def init_cache(self, batch_size: int, max_len: int) -> Any:
    """An empty decoding state for batch_size sequences of at most max_len positions."""
    ...

  def step(self, tokens_BT: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """T new tokens after those in the cache (a prefill, or one): (logits_BTV, new cache).
    step(tokens, init_cache(B, T)) gives the logits of __call__(tokens). Decoding is one
    document: there are no segment ids here."""
    ...

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token at this sequence length, for MFU and compute budgets;
    training costs three times as much."""
    ...


MEMBERS = tuple(
  sorted(
    {n for n in vars(Model) if not n.startswith('_')} | set(Model.__annotations__) | {'__call__'}
  )
)
FAMILY_MEMBERS = ('Config', 'Model', 'RULES', 'TINY', 'CAPABILITIES')


def check_family(module: types.ModuleType) -> None:
  """Raises TypeError naming what `module` lacks of the contract."""
  missing = [n for n in FAMILY_MEMBERS if not hasattr(module, n)]
  if not missing:
    # Looked up in the class's own bases: every class has a __call__ of type's.
    defined = set(getattr(module.Model, '__dataclass_fields__', {}))
    defined.update(*(vars(c) for c in module.Model.__mro__ if c is not object))
    missing = [f'Model.{n}' for n in MEMBERS if n not in defined]
    missing += [] if module.TINY else ['a TINY config']
    if not isinstance(module.CAPABILITIES, Capabilities):
      missing.append('CAPABILITIES as a contract.Capabilities')
  if missing:
    raise TypeError(
      f'model family {module.__name__} does not follow ar_jax.models.contract: '
      f'missing {", ".join(missing)}'
    )
