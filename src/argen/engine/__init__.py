"""Generation engine: the default sampling path of argen (`argen.generate`).

One decode loop: `SlotDecoder` (argen.engine.slots) owns the KV cache, the slots and the step; what a
request brings (`SlotRequest`: condition, SamplingParams, generator, length) is data on its slot, and
how a step advances the slots is its step policy (`PlainStep`, or `JacobiStep` for Jacobi decoding).

- `generate(gpt, cond, ...)`: drop-in for the reference sampler; a static batch through `engine_for(gpt)`.
- `Batches` (also `Engine`, its earlier name): static batches over the loop (admit, step to the end).
- `SlotDecoder`, `SlotRequest`: continuous batching (the server); `JacobiSlotDecoder(gpt, n, window, tree)`
  is `SlotDecoder(gpt, n, JacobiStep(window, tree))` (`DraftTree`: a Jacobi draft tree, `argen.engine.draft_tree`).
- `decode_codes`: tokens -> uint8 images in bounded-memory chunks.
"""

from argen.engine.batches import Batches, Engine, engine_for
from argen.engine.decode import decode_codes
from argen.engine.draft_tree import DraftTree
from argen.engine.generate import generate
from argen.engine.jacobi import DEFAULT_WINDOW, JacobiStep
from argen.engine.slots import PlainStep, SlotDecoder, SlotRequest


def JacobiSlotDecoder(gpt, num_slots: int, window: int = DEFAULT_WINDOW, tree=None,  # noqa: N802
                      **kwargs) -> SlotDecoder:
    """A `SlotDecoder` whose step policy is `JacobiStep(window, tree)` (the earlier class's signature)."""
    return SlotDecoder(gpt, num_slots, JacobiStep(window, tree), **kwargs)


__all__ = ["Batches", "DraftTree", "Engine", "JacobiSlotDecoder", "JacobiStep", "PlainStep", "SlotDecoder",
           "SlotRequest", "decode_codes", "engine_for", "generate"]
