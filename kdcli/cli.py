"""The `kd` console script: takes the verb off argv and hands the rest to Hydra.

Hydra has no subcommands; each verb is a Hydra app with its own primary config
(`kdcli/configs/kd_<verb>.yaml`), so overrides, `-m`, `--cfg job`, `--help` work unchanged.
torch is imported only inside the verbs, so `--help` and `--cfg` answer fast.
"""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "train": ("kdcli.stages.pipeline", "all stages: teacher -> soft-label cache -> student"),
    "teacher": ("kdcli.stages.teacher", "stage 1: train (or reuse) the teacher"),
    "cache": ("kdcli.stages.cache", "stage 2: write the teacher's soft labels to the cache"),
    "student": ("kdcli.stages.student", "stage 3: distil the student from the cache"),
    "eval": ("kdcli.stages.evaluate", "evaluate a checkpoint on a dataset split"),
}
# Verbs that read finished runs rather than compose a config: plain argparse, `main(argv)`.
PLAIN_COMMANDS = {
    "report": ("kdcli.compare", "compare runs (run dirs, multirun dirs) in one table"),
    "export": ("kdcli.export", "export a run's student to ONNX/TorchScript (+ int8), check parity"),
}

USAGE = """usage: kd <command> [hydra overrides...] [-m] [--cfg job] [--help]

commands:
{commands}

examples:
  kd train                                   # main job on the embedded CIFAR-10 subset
  kd train experiment=smoke                  # seconds on a CPU
  kd train teacher=resnet56 student=resnet20 dataset=cifar10
  kd train -m loss.temperature=2,4,8         # sweep; teacher and cache built once
  kd <command> --help                        # config groups and options
"""

log = logging.getLogger("kdcli")


def usage() -> str:
    verbs = {**COMMANDS, **PLAIN_COMMANDS}
    width = max(map(len, verbs))
    lines = [f"  {name:<{width}}  {doc}" for name, (_, doc) in verbs.items()]
    return USAGE.format(commands="\n".join(lines))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        sys.exit(0)
    if sys.argv[1] in ("-V", "--version"):
        from kdcli import __version__

        sys.stdout.write(f"kd {__version__}\n")
        sys.exit(0)
    verb = sys.argv.pop(1)
    if verb in PLAIN_COMMANDS:
        module = importlib.import_module(PLAIN_COMMANDS[verb][0])
        sys.exit(run_plain(verb, module.main, sys.argv[1:]))
    if verb not in COMMANDS:
        sys.stderr.write(f"error: unknown command {verb!r}; choose one of "
                         f"{', '.join([*COMMANDS, *PLAIN_COMMANDS])}\n")
        sys.exit(2)
    sys.argv[0] = f"kd {verb}"
    hydra_app(verb)()


def hydra_app(verb: str):
    """The Hydra entry point of one verb."""
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://kdcli.configs", config_name=f"kd_{verb}")
    def app(cfg):
        return run_command(verb, cfg)

    return app


def run_plain(verb: str, main_fn, argv: list[str]) -> int:
    """Runs a plain verb; a KDError becomes a one-line message and exit 1."""
    from kdcli.errors import KDError

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - "
                        "%(message)s")
    try:
        return int(main_fn(argv) or 0)
    except KDError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


def run_command(verb: str, cfg):
    """Runs a verb on a composed config; a KDError becomes a one-line message and exit 1."""
    from kdcli.errors import KDError

    module = importlib.import_module(COMMANDS[verb][0])
    try:
        return module.main(cfg)
    except KDError as exc:
        log.error("%s", exc)
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)
    except OSError as exc:
        # Disk full, read-only output dir, permission denied: name the file, no traceback.
        log.error("%s", exc)
        sys.stderr.write(f"error: {exc.strerror or exc} ({exc.filename or 'no file'})\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
