"""HTTP serving over the generation engine (`argen serve`).

- `GenerationService`: bounded queue + dynamic batching worker (`argen.serving.service`).
- `create_app(service)`: the FastAPI app (`argen.serving.app`).
- `load_service(...)`: build a service from checkpoint paths (`argen.serving.loading`).
"""

from argen.serving.app import create_app
from argen.serving.service import GenerationService, JobSpec, Overloaded, ServeConfig, ShuttingDown

__all__ = ["GenerationService", "JobSpec", "Overloaded", "ServeConfig", "ShuttingDown", "create_app"]
