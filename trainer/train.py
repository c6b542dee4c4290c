"""``sodkern train``: SFT, GRPO, OPD, SOD and on-policy self-distillation (OPSD) with FSDP2.

    torchrun --nproc_per_node=8 -m sodkern.trainer.train --config configs/sod_qwen3_1.7b.yaml key=value ...
    sodkern train --config configs/tiny_rl.yaml student.path=... output_dir=runs/x   # one process
    sodkern train --print-config                                                      # every key explained

One RL step, file by file (:meth:`Trainer.fit` calls :meth:`sodkern.trainer.rl.RLWorker.step` once per step):

- ``train.py``: the loop: a batch of prompts per rank, the step, the optimizer step it is handed
  (:meth:`Trainer.optimizer_step`), metrics, checkpoints;
- ``rl.py``: the step's phases: sync the engine, roll out, score, old log-probs (recomputed by the FSDP
  student), teacher log-probs, advantages, update with ``sod_loss`` per trajectory;
- ``rollout/loop.py``: multi-turn sampling with the code interpreter on ``rollout/hf_engine.py`` or
  ``rollout/vllm_engine.py``, and scoring with ``tasks/rewards.py``;
- ``advantages.py`` GRPO advantages; ``packing.py`` packed micro-batches; ``parallel.py`` FSDP2 and the fused
  head (``CausalLM``); ``sodkern.sod_loss`` the objective (``sodkern/ops/sod_loss.py``);
- ``metrics.py`` the step's metrics and logs; ``checkpoint.py`` save / resume / export.

SFT steps are :meth:`Trainer.sft_step` (:mod:`sodkern.trainer.sft`). Progress goes to the ``sodkern`` logger
(stderr, one line per step on rank 0), the metrics to ``OUTPUT_DIR/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import AutoTokenizer

from sodkern.trainer import checkpoint as ckpt
from sodkern.trainer.cli import UserError, configure_logging, debug_enabled, exit_on_user_error
from sodkern.trainer.config import Config, ConfigError, config_dict, describe_config, load_config, save_config
from sodkern.trainer.eval import VAL_SAMPLES_FILE, evaluate_student
from sodkern.trainer.metrics import METRICS_FILE, STEPS_FILE, MetricsLogger, progress_line, truncate_after
from sodkern.trainer.packing import pack, pad_to_common_count
from sodkern.trainer.parallel import CausalLM, Dist, compute_dtype, init_distributed, load_causal_lm, shard
from sodkern.trainer.rl import RLWorker
from sodkern.trainer.rollout.chat import ChatFormat
from sodkern.trainer.sft import render_sft, sft_loss
from sodkern.trainer.tasks.data import load_problems, load_sft

log = logging.getLogger("sodkern.train")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row skipped for a non-finite loss or gradient."""


class BatchLoader:
    """Global batches of ``batch_size`` items in a seeded order reshuffled every epoch; each rank takes its
    contiguous slice. Its position (epoch, offset) is checkpointed."""

    def __init__(self, items: list, batch_size: int, d: Dist, *, seed: int, shuffle: bool) -> None:
        if len(items) < batch_size:
            raise ValueError(f"data.batch_size={batch_size} but the training data has only {len(items)} items")
        self.items, self.batch_size, self.d, self.seed, self.shuffle = items, batch_size, d, seed, shuffle
        self.epoch, self.offset = 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.items)))
        return torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_batch(self) -> list:
        if self.offset + self.batch_size > len(self.items):  # drop the last partial batch of an epoch
            self.epoch, self.offset = self.epoch + 1, 0
        idx = self._order()[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        per_rank = self.batch_size // self.d.world_size
        return [self.items[i] for i in idx[self.d.rank * per_rank : (self.d.rank + 1) * per_rank]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


def lr_lambda(cfg: Config, total: int):
    """LR multiplier per optimizer step: linear warmup, then constant or cosine to ``min_lr_ratio``."""
    o = cfg.optim

    def f(i: int) -> float:
        if i < o.warmup_steps:
            return (i + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (i - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class Trainer:
    def __init__(self, cfg: Config, d: Dist) -> None:
        self.cfg, self.d = cfg, d
        self.run_dir = Path(cfg.output_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)
        self.chat = ChatFormat(self.tokenizer)
        dtype = compute_dtype(cfg.student.dtype, d.device)
        s = cfg.student
        hf = load_causal_lm(
            s.path, device=d.device, dtype=torch.float32, attn_implementation=s.attn_implementation,
            liger=s.liger, activation_checkpointing=s.activation_checkpointing,
        )  # fmt: skip
        self.model = shard(CausalLM(hf).train(), d.mesh, compute_dtype=dtype)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )  # fmt: skip
        per_step = (
            1 if cfg.algorithm == "sft" else cfg.loss.ppo_epochs * cfg.data.batch_size // cfg.data.mini_batch_size
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, cfg.train.steps * per_step))
        files = cfg.data.train_files
        if cfg.algorithm == "sft":
            items = [
                render_sft(ex, self.tokenizer, turn_end_ids=self.chat.stop_token_ids,
                           max_length=cfg.data.max_length, where=f"{f} row {i}")
                for f in files for i, ex in enumerate(load_sft(f, skip_bad_rows=cfg.data.skip_bad_rows))
            ]  # fmt: skip
            self.rl = None
        else:
            items = [p for f in files for p in load_problems(f, skip_bad_rows=cfg.data.skip_bad_rows)]
            self.rl = RLWorker(cfg, d, self.model, self.chat, dtype)
            items = self.rl.filter_prompts(items)
        self.eval_problems = [p for f in cfg.eval.files for p in load_problems(f, skip_bad_rows=cfg.data.skip_bad_rows)]
        if self.eval_problems:
            self.eval_problems = self.rl.filter_prompts(self.eval_problems)
        self.loader = BatchLoader(items, cfg.data.batch_size, d, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.nonfinite_in_row = 0
        self.step = 0

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self, logger: MetricsLogger) -> None:
        cfg = self.cfg
        if self.eval_problems and cfg.eval.before_train and self.step == 0:
            logger.log(0, evaluate_student(self.rl, self.eval_problems, 0, self.run_dir))
        first, fit_started = self.step + 1, time.perf_counter()
        for step in range(first, cfg.train.steps + 1):
            started = time.perf_counter()
            if cfg.algorithm == "sft":
                metrics, records = self.sft_step(), []
            else:
                # the RL step; it calls optimizer_step once per PPO mini-batch (clip, step or skip, zero grads)
                metrics, records = self.rl.step(self.loader.next_batch(), optimizer_step=self.optimizer_step)
            metrics.update({"time/step": time.perf_counter() - started, "lr": self.scheduler.get_last_lr()[0]})
            metrics["perf/tokens_per_s"] = metrics.pop("tokens", 0.0) / metrics["time/step"]
            metrics["memory/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            if torch.cuda.is_available():
                metrics["memory/peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if self.eval_problems and (step == cfg.train.steps or (cfg.eval.every and step % cfg.eval.every == 0)):
                metrics.update(evaluate_student(self.rl, self.eval_problems, step, self.run_dir))
            logger.log(step, metrics)
            if self.d.is_main:
                per_step = (time.perf_counter() - fit_started) / (step - first + 1)
                log.info(progress_line(step, cfg.train.steps, metrics, eta_s=per_step * (cfg.train.steps - step)))
            if cfg.log.step_log:
                logger.log_steps([{"step": step, **r} for r in records])
            self.step = step
            if self.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                raise NonFiniteError(
                    f"step {step}: {self.nonfinite_in_row} optimizer steps in a row had a non-finite loss or "
                    "gradient and were skipped (train.max_nonfinite_in_row); weights were left unchanged"
                )
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
                self.save()
        if cfg.checkpoint.export_hf:
            ckpt.export_hf(self.model, cfg.student.path, self.run_dir / "hf")
            if self.d.is_main:
                log.info("exported the student to %s", self.run_dir / "hf")

    def sft_step(self) -> dict[str, float]:
        batch = self.loader.next_batch()
        seqs, masks = [ids for ids, _ in batch], [m for _, m in batch]
        n_local = torch.tensor([float(sum(int(m[1:].sum()) for m in masks))], device=self.d.device)
        dist.all_reduce(n_local)
        num_tokens = n_local.item() / self.d.world_size  # FSDP averages gradients over ranks
        nll = torch.zeros((), device=self.d.device)
        for mb in pad_to_common_count(pack(seqs, masks, self.cfg.train.micro_batch_tokens)):
            mb = mb.to(self.d.device)
            loss, nll_sum = self.model(
                mb.input_ids, mb.position_ids, lambda h, w, mb=mb: sft_loss(h, w, mb, num_tokens)
            )
            loss.backward()
            nll += nll_sum.to(nll.device)
        applied, grad_norm = self.optimizer_step(nll)
        dist.all_reduce(nll)
        tokens = torch.tensor([float(sum(s.numel() for s in seqs))], device=self.d.device)
        dist.all_reduce(tokens)
        return {"loss": nll.item() / n_local.item(), "grad_norm": grad_norm, "skipped": float(not applied),
                "tokens": tokens.item()}  # fmt: skip

    def optimizer_step(self, loss_sum: torch.Tensor) -> tuple[bool, float]:
        """Clip and apply the accumulated gradients, unless the loss (any rank) or the gradient norm is not
        finite: then skip the update (weights untouched) and count it."""
        finite = torch.tensor([float(torch.isfinite(loss_sum).all())], device=loss_sum.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        applied = bool(finite.item()) and math.isfinite(norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            if self.d.is_main:
                log.warning("skipped a non-finite update (loss finite: %s, grad norm %s); %d in a row",
                            bool(finite.item()), norm, self.nonfinite_in_row)  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        return applied, norm

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "nonfinite_in_row": self.nonfinite_in_row,
        }
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints", self.step, self.model, self.optimizer, state, keep=self.cfg.checkpoint.keep
        )
        if self.d.is_main:
            log.info("saved checkpoint %s", path)

    def resume(self) -> None:
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.run_dir / "checkpoints")
        if path is None:
            return
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.nonfinite_in_row = state["step"], state["nonfinite_in_row"]
        if self.d.is_main:
            for name in (METRICS_FILE, STEPS_FILE, VAL_SAMPLES_FILE):  # the steps after the checkpoint run again
                truncate_after(self.run_dir / name, self.step)
            log.info("resumed from %s (step %d)", path, self.step)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sodkern train",
        description="Train with sft | grpo | opd | sod | opsd_gt | opsd_hint (under torchrun for several GPUs).",
        epilog="sodkern train --print-config lists every key with its default and meaning.",
    )
    parser.add_argument("--config", help="YAML config (configs/*.yaml); omitted: the defaults")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value overrides, e.g. optim.lr=1e-6 train.steps=10")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config, each key with its meaning, and exit"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or SODKERN_DEBUG=1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(args.debug)
    configure_logging(debug)
    return exit_on_user_error("sodkern train", lambda: train(args), debug=debug)


def train(args: argparse.Namespace) -> int:
    """Load and check the config, then train (under torchrun: this rank's part)."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise UserError(str(e)) from e
    if args.print_config:
        sys.stdout.write(describe_config(cfg))
        return 0
    own_group = not dist.is_initialized()  # a caller's process group is left to the caller
    d = init_distributed()
    try:
        try:  # the setup reads the user's config, models and data: its errors are the user's to fix
            cfg.validate(d.world_size)
            cfg.check_files()
            transformers.utils.logging.disable_progress_bar()
            if cfg.train.deterministic:
                torch.use_deterministic_algorithms(True)
            torch.manual_seed(cfg.seed + d.rank)  # rollout sampling differs across ranks
            run_dir = Path(cfg.output_dir)
            if d.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, run_dir / "config.yaml")
                log.info("%s on %d process(es), %s; run folder %s", cfg.algorithm, d.world_size, d.device, run_dir)
            trainer = Trainer(cfg, d)
            trainer.resume()
        except (ValueError, OSError) as e:
            raise UserError(str(e)) from e
        logger = MetricsLogger(
            run_dir, enabled=d.is_main, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
            config=config_dict(cfg),
        )  # fmt: skip
        try:
            trainer.fit(logger)
        finally:
            logger.close()
        # Tear down in step: free the sharded model (its tensors hold the process group) while the interpreter
        # is fully alive, and let every rank finish before any destroys its group (a rank exiting on its own
        # left gloo threads to interpreter finalization, which aborted a CPU run about once in 15).
        del trainer
        gc.collect()
        dist.barrier()
    finally:
        if own_group:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
