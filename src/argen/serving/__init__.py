"""HTTP serving over the generation engine (`argen serve`).

- `GenerationService`, `ServeConfig`: bounded queue + slot scheduler, continuous batching by default
  (`argen.serving.service`).
- `create_app(service)`: the FastAPI app (`argen.serving.app`); requests are parsed and checked in
  `argen.serving.request`, precomputed caption features in `argen.serving.features`.
- `prompt_encoder(gpt, name, device)`: the t2i prompt encoder, width-checked (`argen.serving.text`).
"""

from argen.serving.app import create_app
from argen.serving.features import Caption, parse_captions
from argen.serving.request import GenerateRequest, parse_request
from argen.serving.service import GenerationService, JobSpec, Overloaded, ServeConfig, ShuttingDown

__all__ = ["Caption", "GenerateRequest", "GenerationService", "JobSpec", "Overloaded", "ServeConfig", "ShuttingDown",
           "create_app", "parse_captions", "parse_request"]
