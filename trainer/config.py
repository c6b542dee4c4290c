"""Typed training configuration: dataclasses, YAML files in ``configs/``, ``a.b.c=value`` overrides.

``load_config(path, overrides)`` reads a YAML file whose sections mirror :class:`Config`, applies the
command-line overrides (values parsed as YAML: ``3``, ``1e-6``, ``true``, ``[a.parquet, b.parquet]``), checks
every key and type, and validates the combination. ``save_config`` writes the resolved config beside a run.
Defaults are the authors' recipe (SOD.md §2-§3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ALGORITHMS = ("sft", "grpo", "opd", "sod", "opsd_gt", "opsd_hint")
Algorithm = Literal["sft", "grpo", "opd", "sod", "opsd_gt", "opsd_hint"]


@dataclass
class StudentConfig:
    path: str = ""  # local HF folder of the student (config, safetensors, tokenizer)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 compute on GPU, fp32 on CPU
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"  # auto: flash-attn on GPU
    activation_checkpointing: bool = False
    liger: bool = True  # liger-kernel Qwen3 patches (RMSNorm, SwiGLU, RoPE) on GPU when installed


@dataclass
class TeacherConfig:
    path: str = ""  # local HF folder of the teacher (opd, sod); opsd_* use the student itself
    offload: bool = False  # keep the teacher's parameters on CPU between uses (GPU only)
    server: str = ""  # URL of a vLLM server serving the teacher (prompt log-probs); replaces path for opd/sod
    # opsd_*: what is added to the last user message of the teacher's prompt
    gt_template: str = (
        "\n\nThe reference answer is: {answer}\nReason as if you had found it yourself and give the same answer."
    )
    hint_template: str = "\n\nHint: {hint}"
    hint_field: str = "hint"  # key of Problem.extra_info holding the hint (opsd_hint)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # RL problems, or SFT trajectories for sft
    batch_size: int = 64  # prompts per step (RL) or trajectories per step (SFT), all ranks together
    mini_batch_size: int = 16  # prompts per PPO mini-batch (one optimizer step), all ranks together
    max_length: int = 32768  # SFT: trajectories are cut to this many tokens
    shuffle: bool = True
    skip_bad_rows: bool = False


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"  # vllm: an in-process vLLM engine, weights updated in place each step
    n: int = 16  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 2560
    max_response_tokens: int = 20480
    max_turns: int = 16  # assistant turns
    tool_timeout_s: float = 10.0
    overlong_penalty: bool = True
    overlong_buffer: int = 1024
    tool_shaping: bool = True
    reward_fn: str = ""  # "module:function" used for every problem; empty: the built-in reward by data source


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)  # held-out problems evaluated during RL (verl's val_files)
    every: int = 0  # steps between evaluations; 0 = only after the last step (when files are given)
    before_train: bool = False  # evaluate the starting student too, logged as step 0
    n: int = 32  # samples per problem: val/average@n, val/pass@n, val/maj@n
    temperature: float = 1.0
    top_p: float = 0.6  # the recipe's evaluation sampling (SOD.md §3)


@dataclass
class LossConfig:
    eps: float = 1e-6
    delta: float = 0.2
    opd_coef: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float = 3.0
    ppo_epochs: int = 1
    distill: Literal["logprob", "full_kl"] = "logprob"  # full_kl: dense reverse KL with the teacher's hidden


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0  # optimizer steps
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr


@dataclass
class TrainConfig:
    steps: int = 200  # training steps (one batch each)
    micro_batch_tokens: int = 32768  # token budget of one packed micro-batch (per rank)
    max_nonfinite_in_row: int = 3  # stop after this many skipped (non-finite) optimizer steps in a row
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact resume on CPU needs no more)


@dataclass
class CheckpointConfig:
    every: int = 50  # steps; 0 = only at the end
    keep: int = 2  # newest checkpoints kept
    resume: str = "auto"  # auto (latest in the run folder) | none | a checkpoint folder
    export_hf: bool = True  # write the student as a HF folder at the end (run_dir/hf)


@dataclass
class LogConfig:
    tensorboard: bool = True  # when tensorboard is installed
    wandb_project: str = ""  # empty: no wandb; offline unless WANDB_MODE says otherwise
    step_log: bool = True  # per-trajectory step divergences and weights to steps.jsonl (grpo/opd/sod/opsd)


@dataclass
class Config:
    algorithm: Algorithm = "sod"
    output_dir: str = ""  # the run folder: config.yaml, metrics.jsonl, steps.jsonl, checkpoints/, hf/
    seed: int = 0
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def weighting(self) -> Literal["sod", "uniform", "none"]:
        """The sod_loss weighting of the algorithm: grpo has no teacher term, opd uniform, sod/opsd_* step."""
        return {"grpo": "none", "opd": "uniform"}.get(self.algorithm, "sod")

    def validate(self, world_size: int = 1) -> None:
        """Raise ValueError naming the field for an inconsistent combination."""
        if not self.student.path:
            raise ValueError("student.path is empty: set it to a local HF model folder (student.path=...)")
        if not self.output_dir:
            raise ValueError("output_dir is empty: set it to the run folder (output_dir=...)")
        if not self.data.train_files:
            raise ValueError("data.train_files is empty: give the parquet/JSONL files (data.train_files=[...])")
        if self.algorithm in ("opd", "sod") and not (self.teacher.path or self.teacher.server):
            raise ValueError(
                f"algorithm {self.algorithm} needs teacher.path (a local HF model folder) or teacher.server (a URL)"
            )
        if self.teacher.server and self.rollout.temperature != 1.0:
            raise ValueError(
                "teacher.server returns temperature-1 prompt log-probs: it needs rollout.temperature=1.0, "
                f"got {self.rollout.temperature}"
            )
        if self.teacher.server and self.loss.distill == "full_kl":
            raise ValueError(
                "loss.distill=full_kl needs the teacher's hidden states: use teacher.path, not teacher.server"
            )
        if self.loss.distill == "full_kl" and self.algorithm in ("sft", "grpo"):
            raise ValueError(f"loss.distill=full_kl needs a teacher term; algorithm {self.algorithm} has none")
        d = self.data
        for name, value in (("data.batch_size", d.batch_size), ("data.mini_batch_size", d.mini_batch_size)):
            if value < 1 or value % world_size:
                raise ValueError(f"{name}={value} must be a positive multiple of the world size {world_size}")
        if self.algorithm != "sft" and d.batch_size % d.mini_batch_size:
            raise ValueError(f"data.batch_size={d.batch_size} must be a multiple of data.mini_batch_size")
        for name, value in (
            ("rollout.n", self.rollout.n),
            ("loss.ppo_epochs", self.loss.ppo_epochs),
            ("train.steps", self.train.steps),
            ("train.micro_batch_tokens", self.train.micro_batch_tokens),
            ("train.max_nonfinite_in_row", self.train.max_nonfinite_in_row),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if self.eval.files and self.algorithm == "sft":
            raise ValueError("eval.files: held-out evaluation runs with the RL rollout engine; algorithm sft has none")
        if self.eval.n < 1 or self.eval.every < 0:
            raise ValueError(f"eval.n must be >= 1 and eval.every >= 0, got {self.eval.n} and {self.eval.every}")
        if self.checkpoint.every < 0 or self.checkpoint.keep < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


# ------------------------------------------------------------------------------------------ YAML + overrides


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked (and converted where lossless) against the annotation ``tp``; ValueError naming it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{name}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], name)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML 1.1 reads "1e-6" as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{name}: unsupported config type {tp!r}")


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key '{prefix}{unknown[0]}'; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, tp, f"{source}: {prefix}{name}")
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` items (value parsed as YAML) into the nested dict ``raw`` (modified, returned)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-6")
        node = raw
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: '{p}' is not a section")
        node[leaf] = yaml.safe_load(text) if text.strip() else ""
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The :class:`Config` of a YAML file (or the defaults if ``path`` is None) with ``overrides`` applied.

    Raises:
        ValueError: naming the file (or "override") and the key, for an unknown key or a wrongly typed value.
    """
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        source = f"{source} + overrides"
    return _build(Config, apply_overrides(raw, list(overrides)), "", source)


def config_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML (loadable with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
