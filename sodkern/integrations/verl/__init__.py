"""sodkern inside verl.

- :func:`compute_stepwise_opd_weights`: drop-in for the SOD authors' fork (verl 0.5-era); needs no verl import.
- ``sodkern.integrations.verl.plugin``: the ``verl.plugins`` entry point for verl 0.9.1, installed with
  ``pip install "sodkern[verl]"``. It registers the distillation loss modes ``sod`` and ``sod_uniform`` and, with
  ``SODKERN_VERL_FUSED_KERNEL=1``, serves verl's fused log-prob/entropy kernel from :func:`sodkern.linear_logprobs`.
"""

from sodkern.integrations.verl.fork import compute_stepwise_opd_weights

__all__ = ["compute_stepwise_opd_weights"]
