"""The process users reach in front of Triton: KServe v2 HTTP and gRPC proxied to Triton's loopback ports after
limits that keep hostile requests away from it, plus OpenAI-compatible routes. See docs/GATEWAY.md."""

import os

# The supervisor forks tritonserver while the front's gRPC threads run; gRPC's fork handlers then abort the child
# (epoll state shared across fork). The child only execs, so it needs none: off before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from .server import Front, FrontStartupError
from .settings import FrontSettings

__all__ = ["Front", "FrontSettings", "FrontStartupError"]
