"""The LLM stage: `stage` (checkpoint, prompts), `scheduler` (who runs), `batch` + `kv_cache` (KV state),
`runner` (model execution), `sampler` (next tokens), `engine` (the thread that connects them)."""

from .engine import AbandonedError, CancelledError, EngineLimits, EngineObserver, InflightEngine, Job
from .sequence import Completion
from .stage import LanguageStage

__all__ = ["AbandonedError", "CancelledError", "Completion", "EngineLimits", "EngineObserver", "InflightEngine",
           "Job", "LanguageStage"]
