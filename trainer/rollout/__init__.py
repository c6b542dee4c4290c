"""Generation: the multi-turn tool rollout loop, the chat / tool-call format, and the generation engines.

- :mod:`.loop`: the engine-agnostic multi-turn loop (:func:`~.loop.rollout`), trajectories and their masks.
- :mod:`.chat`: prompts, tool-call parsing and tool observations as token ids.
- :mod:`.hf_engine`: the Hugging Face ``transformers`` engine (the CPU default).
- :mod:`.vllm_engine`, :mod:`.vllm_async`, :mod:`.vllm_server`: vLLM in process (in-place weight sync),
  continuous-batching rollouts on it, and a vLLM server with pushed weights / a remote teacher.
"""
