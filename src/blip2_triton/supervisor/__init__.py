"""The control plane around tritonserver (layout: README, "Architecture")."""

from .command import ADMIN_KEY_HEADER, RESTRICTED_APIS, stage_environment, tritonserver_command
from .install import TritonInstall, find_tritonserver
from .lifecycle import FAULT_EXIT_CODE, serve, supervise
from .server import TritonServer
from .settings import LauncherError, LaunchSettings, StartupInterruptedError, free_port

__all__ = [
    "ADMIN_KEY_HEADER", "FAULT_EXIT_CODE", "RESTRICTED_APIS", "LaunchSettings", "LauncherError",
    "StartupInterruptedError", "TritonInstall", "TritonServer", "find_tritonserver", "free_port", "serve",
    "stage_environment", "supervise", "tritonserver_command",
]
