"""The process users reach in front of Triton: KServe v2 HTTP and gRPC proxied to Triton's loopback ports after
limits that keep hostile requests away from it, plus OpenAI-compatible routes. See docs/GATEWAY.md."""

from .server import Front, FrontStartupError
from .settings import FrontSettings

__all__ = ["Front", "FrontSettings", "FrontStartupError"]
