"""What the gRPC and HTTP adapters share at run time: the config, the repository, the metrics
and the lifecycle flags. Its own module so that neither adapter imports the other, nor the
server that assembles them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from .config import ServerConfig
from .metrics import ServerMetrics
from .repository import ModelRepository


@dataclass
class ServerState:
    config: ServerConfig
    repository: ModelRepository
    metrics: ServerMetrics
    draining: bool = False
    started: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # tandem.cloud.generation's GenerationService when the repository names generative models
    # (folders with generation.json); None keeps the tensor-only server as it was.
    generation: Any = None

    @property
    def ready(self) -> bool:
        return self.started and not self.draining
