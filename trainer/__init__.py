"""The trainer, installed as ``sodkern.trainer``.

The loop core, flat: :mod:`.train` (``sodkern train``: the loop), :mod:`.rl` (one RL step), :mod:`.sft`,
:mod:`.advantages`, :mod:`.packing`, :mod:`.parallel` (FSDP2, the fused head), :mod:`.checkpoint`,
:mod:`.config`, :mod:`.metrics`, and the commands :mod:`.cli` (``sodkern``), :mod:`.eval`, :mod:`.plot`.
Four rooms: ``rollout/`` (generation: the multi-turn loop and its engines), ``tasks/`` (problems, prompts,
rewards), ``demo/`` (``sodkern demo``), ``sandbox/`` (the code interpreter).
"""
