"""The ``sodkern`` command: ``sodkern SUBCOMMAND ...``; each subcommand owns its own options."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a ``main(argv)`` function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sandbox": ("sodkern.trainer.sandbox.cli", "run a Python file in the code-interpreter sandbox"),
    "eval": ("sodkern.trainer.eval", "evaluate a model on parquet/JSONL data: average@k, pass@k, maj@k"),
    "train": ("sodkern.trainer.train", "train (sft | grpo | opd | sod | opsd_gt | opsd_hint) in one process"),
    "demo": ("sodkern.trainer.demo.demo", "the whole SOD story on CPU: teacher, student, GRPO vs OPD vs SOD, plots"),
    "plot": ("sodkern.trainer.plot", "plot training curves and SOD step-weight patterns from a run folder"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = missing_train_modules()
    if missing:  # `pip install sodkern` alone has the ops, not the commands
        extra = 'pip install "sodkern[train]"'
        print(f"sodkern: the commands need the [train] extra (missing {', '.join(missing)}): {extra}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: sodkern {" + ",".join(SUBCOMMANDS) + "} ...\n")
        for name, (_, help_) in SUBCOMMANDS.items():
            print(f"  {name:<10} {help_}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


# What the commands import beyond the core ops (the ``[train]`` extra), as top-level module names.
TRAIN_MODULES = ("transformers", "tokenizers", "safetensors", "pyarrow", "yaml", "math_verify", "tqdm", "rich")


def missing_train_modules() -> list[str]:
    """The ``[train]`` extra's modules that cannot be imported here."""
    import importlib.util

    missing = []
    for name in TRAIN_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # sys.modules[name] is None: the import is blocked
            found = False
        if not found:
            missing.append(name)
    return missing


if __name__ == "__main__":
    raise SystemExit(main())
