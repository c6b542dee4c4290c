"""The ``verl.plugins`` entry point: verl imports this module on every ``import verl`` (driver and Ray workers).

It changes nothing until asked for:

- registers the distillation loss modes ``sod`` and ``sod_uniform`` and routes them (only them) to
  :func:`sodkern.integrations.verl.loss.sod_ppo_loss` inside verl's ``distillation_ppo_loss``;
- with ``SODKERN_VERL_FUSED_KERNEL=1`` in the environment, serves verl's fused log-prob/entropy kernel
  (``fused_kernel_options.impl_backend=triton``) from :func:`sodkern.linear_logprobs`.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("sodkern.integrations.verl")


def _install_loss() -> None:
    import verl.trainer.distillation as distillation
    import verl.trainer.distillation.losses as losses

    from sodkern.integrations.verl.loss import wrap_distillation_ppo_loss

    if getattr(losses.distillation_ppo_loss, "sodkern_wrapped", False):
        return
    wrapped = wrap_distillation_ppo_loss(losses.distillation_ppo_loss)
    losses.distillation_ppo_loss = wrapped
    distillation.distillation_ppo_loss = wrapped
    engine_workers = sys.modules.get("verl.workers.engine_workers")
    if engine_workers is not None:  # imported before the plugin: rebind its module-level name too
        engine_workers.distillation_ppo_loss = wrapped


def _install_fused_kernel() -> None:
    import verl.utils.kernel.linear_cross_entropy as lce

    from sodkern.integrations.verl.fused_head import linear_cross_entropy

    lce.linear_cross_entropy = linear_cross_entropy
    logger.info("verl's fused log-prob/entropy kernel is served by sodkern.linear_logprobs")


def install() -> None:
    """Register SOD's loss modes and, with ``SODKERN_VERL_FUSED_KERNEL=1``, the fused head. Idempotent."""
    try:
        _install_loss()
        if os.environ.get("SODKERN_VERL_FUSED_KERNEL", "0") not in ("", "0"):
            _install_fused_kernel()
    except Exception:  # verl logs plugin failures at debug level only: say it where users look
        logger.warning("sodkern's verl plugin failed to load", exc_info=True)
        raise


install()
