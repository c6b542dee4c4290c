"""SOD inside TRL (``pip install "sodkern[trl]"``).

- :class:`SODConfig` / :class:`SODTrainer`: SOD on ``GRPOTrainer``'s own (multi-turn tool) rollouts.
- :func:`code_interpreter_tool`: sodkern's sandboxed code interpreter as a TRL tool.
- :func:`math_reward_func`: sodkern's math reward with the recipe's tool-call shaping as a TRL reward function.
- :func:`use_sodkern_head` / :func:`use_trl_head`: TRL's fused LM head served by sodkern, and back.
"""

try:
    import trl  # noqa: F401
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError('sodkern.integrations.trl needs TRL 1.16: pip install "sodkern[trl]"') from e

from sodkern.integrations.trl.config import SODConfig
from sodkern.integrations.trl.head import SodkernLogProbFunction, sodkern_head_active, use_sodkern_head, use_trl_head
from sodkern.integrations.trl.tools import code_interpreter_tool, math_reward_func
from sodkern.integrations.trl.trainer import SODTrainer

__all__ = [
    "SODConfig",
    "SODTrainer",
    "SodkernLogProbFunction",
    "code_interpreter_tool",
    "math_reward_func",
    "sodkern_head_active",
    "use_sodkern_head",
    "use_trl_head",
]
