"""The code-interpreter sandbox: run the model's Python tool calls safely, locally or on SandboxFusion.

from sodkern.trainer.sandbox import CodeInterpreter, LocalSandbox
tool = CodeInterpreter(LocalSandbox(timeout=10))
tool.execute("```python\\nimport math\\nmath.factorial(10)\\n```").observation()   # '3628800'
"""

from sodkern.trainer.sandbox.fusion import SandboxFusionClient
from sodkern.trainer.sandbox.interpreter import CodeInterpreter, prepare_code
from sodkern.trainer.sandbox.local import LocalSandbox, find_launcher
from sodkern.trainer.sandbox.result import ExecResult, escape_control
from sodkern.trainer.sandbox.server import SandboxUnavailable

__all__ = [
    "CodeInterpreter",
    "ExecResult",
    "LocalSandbox",
    "SandboxFusionClient",
    "SandboxUnavailable",
    "escape_control",
    "find_launcher",
    "prepare_code",
]
