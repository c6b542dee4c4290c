"""Typed training configuration: dataclasses, YAML files in ``configs/``, ``a.b.c=value`` overrides.

``load_config(path, overrides)`` reads a YAML file whose sections mirror :class:`Config`, applies the
command-line overrides (values parsed as YAML: ``3``, ``1e-6``, ``true``, ``[a.parquet, b.parquet]``), checks
every key and type (:class:`ConfigError` names the key). :meth:`Config.validate` checks the combination and
:meth:`Config.check_files` the model folders and data files; ``save_config`` writes the resolved config beside
a run. Each field is defined with its meaning (:func:`option`); the defaults are the authors' recipe, and
``sodkern train --print-config`` lists every key with its value and meaning.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Algorithm = Literal["sft", "grpo", "opd", "sod", "opsd_gt", "opsd_hint"]


class ConfigError(ValueError):
    """A config mistake the user can fix; the message names the file or override, the key and the fix."""


def option(default: Any, help: str) -> Any:
    """A config field: its default and its meaning (listed by ``sodkern train --print-config``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class StudentConfig:
    """The model being trained."""

    path: str = option("", "local Hugging Face folder of the student (config.json, safetensors, tokenizer)")
    dtype: Literal["auto", "bfloat16", "float32"] = option(
        "auto", "compute dtype; auto: bfloat16 on GPU, float32 on CPU (master weights and gradients stay fp32)"
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = option(
        "auto", "attention kernel; auto: flash-attn varlen on GPU when installed, else SDPA"
    )
    activation_checkpointing: bool = option(False, "recompute each decoder layer in the backward (less memory)")
    liger: bool = option(True, "liger-kernel Qwen3 patches (RMSNorm, SwiGLU, RoPE) on GPU when installed")


@dataclass
class TeacherConfig:
    """The teacher of opd / sod (a local model or a vLLM server), and the prompts of opsd_* self-distillation."""

    path: str = option("", "local Hugging Face folder of the teacher (opd, sod); opsd_* use the student itself")
    offload: bool = option(False, "keep the teacher's parameters on CPU between uses (GPU only)")
    server: str = option("", "URL of a vLLM server serving the teacher's prompt log-probs; replaces path (opd, sod)")
    gt_template: str = option(
        "\n\nThe reference answer is: {answer}\nReason as if you had found it yourself and give the same answer.",
        "opsd_gt: appended to the last user message of the teacher's prompt ({answer}: the ground truth)",
    )
    hint_template: str = option(
        "\n\nHint: {hint}", "opsd_hint: appended to the last user message of the teacher's prompt ({hint})"
    )
    hint_field: str = option("hint", "opsd_hint: the key of a problem's extra_info that holds its hint")


@dataclass
class DataConfig:
    """Training data and batch sizes."""

    train_files: list[str] = option([], "parquet / JSONL files: RL problems, or SFT trajectories for sft")
    batch_size: int = option(64, "prompts per step (RL) or trajectories per step (sft), all ranks together")
    mini_batch_size: int = option(16, "prompts per PPO mini-batch (one optimizer step), all ranks together")
    max_length: int = option(32768, "sft: trajectories are cut to this many tokens")
    shuffle: bool = option(True, "reshuffle the data every epoch (seeded by seed)")
    skip_bad_rows: bool = option(False, "skip malformed rows with a warning instead of stopping at the first")


@dataclass
class RolloutConfig:
    """How the student samples its responses during RL, and how they are rewarded."""

    engine: Literal["hf", "vllm"] = option(
        "hf", "hf: a plain copy of the student per rank; vllm: an in-process vLLM engine updated in place each step"
    )
    n: int = option(16, "responses per prompt (the GRPO group)")
    temperature: float = option(1.0, "sampling temperature (also divides the trainer's logits)")
    top_p: float = option(1.0, "nucleus sampling; 1.0: off (training)")
    max_prompt_tokens: int = option(2560, "longer prompts are dropped (with a warning)")
    max_response_tokens: int = option(20480, "tokens per response, tool outputs included")
    max_turns: int = option(16, "assistant turns per response")
    max_turn_tokens: int = option(
        0, "tokens per assistant turn; a turn that reaches it ends the response ('length'); 0: no cap"
    )
    tool_timeout_s: float = option(10.0, "seconds a code-interpreter call may run")
    overlong_penalty: bool = option(
        True, "DAPO soft penalty: 0 at max_response_tokens - overlong_buffer tokens down to -1 at the limit"
    )
    overlong_buffer: int = option(1024, "length of the overlong penalty ramp, in tokens")
    tool_shaping: bool = option(
        True, "a wrong answer (-1) gets min(-0.6, -1 + (turns - 2) / 2 * 0.1): more tool turns, less penalty"
    )
    reward_fn: str = option("", "'module:function' reward used for every problem; empty: built in, by data source")


@dataclass
class EvalConfig:
    """Held-out evaluation during RL (verl's val_files / test_freq)."""

    files: list[str] = option([], "held-out problems evaluated during RL; empty: no evaluation")
    every: int = option(0, "steps between evaluations; 0: only after the last step (when files are given)")
    before_train: bool = option(False, "evaluate the starting student too, logged as step 0")
    n: int = option(32, "samples per problem: val/average@n, val/pass@n, val/maj@n")
    temperature: float = option(1.0, "evaluation sampling temperature")
    top_p: float = option(0.6, "evaluation nucleus sampling (the recipe's)")


@dataclass
class LossConfig:
    """The SOD objective (README: "The algorithm")."""

    eps: float = option(1e-6, "eps of the step weights w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)")
    delta: float = option(0.2, "w_k is at most 1 + delta")
    opd_coef: float = option(1.0, "c: the weight of the teacher term c * w_k * (tau_t - s_t) in the advantage")
    clip_low: float = option(0.2, "PPO ratio clip below: 1 - clip_low")
    clip_high: float = option(0.28, "PPO ratio clip above: 1 + clip_high")
    clip_c: float = option(3.0, "dual clip: for A_t < 0 the loss is capped at -A_t * clip_c")
    ppo_epochs: int = option(1, "passes over the step's mini-batches")
    distill: Literal["logprob", "full_kl"] = option(
        "logprob", "logprob: the sampled-token teacher term; full_kl: dense reverse KL from the teacher's hidden"
    )


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = option(1e-6, "peak learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    grad_clip: float = option(1.0, "clip the gradient norm to this; <= 0: no clipping")
    warmup_steps: int = option(0, "linear warmup, in optimizer steps")
    schedule: Literal["constant", "cosine"] = option("constant", "learning rate after the warmup")
    min_lr_ratio: float = option(0.0, "cosine floor, as a fraction of lr")


@dataclass
class TrainConfig:
    """The loop."""

    steps: int = option(200, "training steps (one batch each)")
    micro_batch_tokens: int = option(32768, "token budget of one packed micro-batch (per rank)")
    max_nonfinite_in_row: int = option(3, "stop after this many skipped (non-finite) optimizer steps in a row")
    deterministic: bool = option(False, "torch.use_deterministic_algorithms (exact resume on CPU needs no more)")


@dataclass
class CheckpointConfig:
    """Checkpoints of the run folder (run_dir/checkpoints) and the final export."""

    every: int = option(50, "steps between checkpoints; 0: only at the end")
    keep: int = option(2, "newest checkpoints kept")
    resume: str = option("auto", "auto: the latest in the run folder | none | a checkpoint folder")
    export_hf: bool = option(True, "write the trained student as a Hugging Face folder at the end (run_dir/hf)")


@dataclass
class LogConfig:
    """Logs besides metrics.jsonl."""

    tensorboard: bool = option(True, "also write tensorboard events (when tensorboard is installed)")
    wandb_project: str = option("", "wandb project; empty: no wandb (offline unless WANDB_MODE says otherwise)")
    step_log: bool = option(True, "per-trajectory step divergences and weights to steps.jsonl (RL)")


@dataclass
class Config:
    """A training run: ``sodkern train --config FILE key=value ...``."""

    algorithm: Algorithm = option(
        "sod",
        "what to train: sft (supervised), grpo (outcome reward only), opd (+ the teacher term, uniform), "
        "sod (+ the teacher term, step-weighted), opsd_gt / opsd_hint (sod, the student given the answer / a hint "
        "as its own teacher)",
    )
    output_dir: str = option("", "the run folder: config.yaml, metrics.jsonl, steps.jsonl, checkpoints/, hf/")
    seed: int = option(0, "seeds the data order and the sampling (rank r samples with seed + r)")
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
        """Raise :class:`ConfigError` naming the field for a missing value or an inconsistent combination."""
        if not self.student.path:
            raise ConfigError("student.path is empty: set it to a local HF model folder (student.path=...)")
        if not self.output_dir:
            raise ConfigError("output_dir is empty: set it to the run folder (output_dir=...)")
        if not self.data.train_files:
            raise ConfigError("data.train_files is empty: give the parquet/JSONL files (data.train_files=[...])")
        if self.algorithm in ("opd", "sod") and not (self.teacher.path or self.teacher.server):
            raise ConfigError(
                f"algorithm {self.algorithm} needs teacher.path (a local HF model folder) or teacher.server (a URL)"
            )
        if self.teacher.server and self.rollout.temperature != 1.0:
            raise ConfigError(
                "teacher.server returns temperature-1 prompt log-probs: it needs rollout.temperature=1.0, "
                f"got {self.rollout.temperature}"
            )
        if self.teacher.server and self.loss.distill == "full_kl":
            raise ConfigError(
                "loss.distill=full_kl needs the teacher's hidden states: use teacher.path, not teacher.server"
            )
        if self.loss.distill == "full_kl" and self.algorithm in ("sft", "grpo"):
            raise ConfigError(f"loss.distill=full_kl needs a teacher term; algorithm {self.algorithm} has none")
        d = self.data
        for name, value in (("data.batch_size", d.batch_size), ("data.mini_batch_size", d.mini_batch_size)):
            if value < 1 or value % world_size:
                raise ConfigError(f"{name}={value} must be a positive multiple of the world size {world_size}")
        if self.algorithm != "sft" and d.batch_size % d.mini_batch_size:
            raise ConfigError(f"data.batch_size={d.batch_size} must be a multiple of data.mini_batch_size")
        for name, value in (
            ("rollout.n", self.rollout.n),
            ("loss.ppo_epochs", self.loss.ppo_epochs),
            ("train.steps", self.train.steps),
            ("train.micro_batch_tokens", self.train.micro_batch_tokens),
            ("train.max_nonfinite_in_row", self.train.max_nonfinite_in_row),
        ):
            if value < 1:
                raise ConfigError(f"{name}={value} must be >= 1")
        if self.rollout.max_turn_tokens < 0:
            raise ConfigError(f"rollout.max_turn_tokens={self.rollout.max_turn_tokens} must be >= 0 (0: no cap)")
        if self.eval.files and self.algorithm == "sft":
            raise ConfigError("eval.files: held-out evaluation runs with the RL rollout engine; algorithm sft has none")
        if self.eval.n < 1 or self.eval.every < 0:
            raise ConfigError(f"eval.n must be >= 1 and eval.every >= 0, got {self.eval.n} and {self.eval.every}")
        if self.checkpoint.every < 0 or self.checkpoint.keep < 1:
            raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")

    def check_files(self) -> None:
        """Raise :class:`ConfigError` naming the key when a model folder or data file the run reads is missing."""
        models = [("student.path", self.student.path)]
        if self.teacher.path and self.algorithm in ("opd", "sod"):
            models.append(("teacher.path", self.teacher.path))
        for key, path in models:
            if not Path(path).is_dir():
                raise ConfigError(f"{key}={path}: no such folder; give a local Hugging Face model folder")
            if not (Path(path) / "config.json").exists():
                raise ConfigError(f"{key}={path}: no config.json there; give a local Hugging Face model folder")
        for key, files in (("data.train_files", self.data.train_files), ("eval.files", self.eval.files)):
            for f in files:
                if not Path(f).is_file():
                    raise ConfigError(f"{key}: {f}: no such file")


# ------------------------------------------------------------------------------------------ YAML + overrides


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked (and converted where lossless) against the annotation ``tp``; ValueError naming it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}: expected one of {list(typing.get_args(tp))}, got {value!r}")
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
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML 1.1 reads "1e-6" as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{name}: unsupported config type {tp!r}")


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.5)
        hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'; {hint}known keys: {sorted(known)} "
            "(sodkern train --print-config lists them all)"
        )
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
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-6")
        node = raw
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
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
            raise ConfigError(f"{path}: config file not found; --config takes a YAML file (configs/*.yaml)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        source = f"{source} + overrides"
    return _build(Config, apply_overrides(raw, list(overrides)), "", source)


def config_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML (loadable with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))


def describe_config(cfg: Config) -> str:
    """``cfg`` as YAML with every key's meaning as a comment (loadable with :func:`load_config`)."""
    lines: list[str] = []

    def walk(obj: Any, indent: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:  # {(type(value).__doc__ or '').strip().splitlines()[0]}")
                walk(value, indent + "  ")
                continue
            text = json.dumps(value)  # JSON is YAML: strings quoted, lists in brackets
            meaning = f.metadata.get("help", "")
            if typing.get_origin(hints[f.name]) is Literal:
                meaning += f" (one of: {', '.join(map(str, typing.get_args(hints[f.name])))})"
            lines.append(f"{indent}{f.name}: {text}  # {meaning}")

    walk(cfg, "")
    return "\n".join(lines) + "\n"
