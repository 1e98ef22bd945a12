"""Generation engine: the default sampling path of argen (`argen.generate`).

- `generate(gpt, cond, ...)`: drop-in for the reference sampler, through a cached `Engine`.
- `Engine`: static KV cache, lean decode loop, on-device sampling, CUDA graphs on GPUs; per-row
  sampling parameters and generators for the server.
- `SlotDecoder`, `SlotRequest`: continuous batching over a fixed number of cache slots (the server);
  `JacobiSlotDecoder`: the same with a Jacobi iteration per step.
- `decode_codes`: tokens -> uint8 images in bounded-memory chunks.
"""

from argen.engine.decode import decode_codes
from argen.engine.engine import Engine
from argen.engine.generate import engine_for, generate
from argen.engine.jacobi_slots import JacobiSlotDecoder
from argen.engine.slots import SlotDecoder, SlotRequest

__all__ = ["Engine", "JacobiSlotDecoder", "SlotDecoder", "SlotRequest", "decode_codes", "engine_for", "generate"]
