"""The `kd` console script: takes the verb off argv and hands the rest to Hydra.

Hydra has no subcommands; each verb is a Hydra app with its own primary config
(`kdcli/configs/kd_<verb>.yaml`), so overrides, `-m`, `--cfg job`, `--help` work unchanged.
torch is imported only inside the verbs, so `--help`, `--cfg` and tab completion answer fast.

Shell completion goes through here too: Hydra's completion strips only the first word of the
command line, so `kd train tea<TAB>` would reach it as `train tea`. `-sc query=...` is answered
here: the verb itself is completed from the command list, and after the verb the line is
rewritten to `kd <rest>` and handed to that verb's Hydra app.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from kdcli.runfolder import FAILED, set_aside_earlier_run

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
    "store": ("kdcli.storecmd", "list the store's entries and sizes; prune damaged/old ones"),
}
# `kd store <TAB>`: its actions (a path completes as a file name).
STORE_ACTIONS = ("list", "prune")

USAGE = """usage: kd <command> [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job] [--help]
       kd report PATH... | kd export RUN_DIR [--int8]
       kd store [list|prune] [STORE] [--damaged] [--incomplete] [--older-than DAYS] [--yes]
       kd --completion bash|zsh | kd --version

commands:
{commands}

examples:
  kd train                                   # main job on the embedded CIFAR-10 subset
  kd train experiment=smoke                  # seconds on a CPU
  kd train teacher=resnet56 student=resnet20 dataset=cifar10
  kd train dataset=imagefolder dataset.loader.root=/data/mine \\
      teacher=resnet50 student=mobilenet_v3_small      # your images at 224 px
  kd train -m loss.temperature=2,4,8         # sweep; teacher and cache built once
  kd report multirun/                        # compare finished runs
  kd export outputs/<date>/<time> --int8     # ONNX + TorchScript (+ int8), parity-checked
  kd store                                   # what the store holds, size per stage
  kd store prune --older-than 30             # dry run; --yes removes (skips entries in use)
  kd <command> --help                        # its config groups, options and flags
  eval "$(kd --completion bash)"             # tab completion: kd train tea<TAB>
"""

COMPLETION_FLAGS = ("-sc", "--shell-completion")
# bash (zsh after bashcompinit): the verb completes with a trailing space; after it, Hydra's
# words (`teacher=`, `teacher=resnet20`) without one, and file names where nothing matches.
BASH_SCRIPT = r"""# kd tab completion: eval "$(kd --completion bash)", e.g. in ~/.bashrc
_kd_completion()
{
    local word="${COMP_WORDS[COMP_CWORD]}"
    local choices
    choices=$(COMP_POINT=$COMP_POINT COMP_LINE=$COMP_LINE \
        "${COMP_WORDS[0]}" -sc query=bash 2>/dev/null)
    if [ "$COMP_CWORD" -le 1 ] || { [ "$COMP_CWORD" -eq 2 ] && [ "${COMP_WORDS[1]}" = store ]; }
    then
        COMPREPLY=($(compgen -W "$choices" -- "$word"))
    else
        compopt -o nospace 2>/dev/null
        COMPREPLY=($(compgen -W "$choices" -- "$word"))
    fi
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o default -F _kd_completion kd
"""
ZSH_PREFIX = "autoload -Uz bashcompinit && bashcompinit\n"

log = logging.getLogger("kdcli")


def usage() -> str:
    verbs = {**COMMANDS, **PLAIN_COMMANDS}
    width = max(map(len, verbs))
    lines = [f"  {name:<{width}}  {doc}" for name, (_, doc) in verbs.items()]
    return USAGE.format(commands="\n".join(lines))


# Verbs that train, so that an earlier run in their folder is set aside first (runfolder).
SETS_ASIDE = ("train", "teacher", "student")
# Jobs of this process's `-m` sweep: the folder of each that ran, and (folder, one-line error)
# of each that failed.
SWEEP_JOBS: list[str] = []
FAILED_JOBS: list[tuple[str, str]] = []


RESUME = ("run the same command again to go on (each stage resumes from its last saved epoch "
          "in the store)")
INTERRUPTED = f"interrupted: {RESUME}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: Slurm at a job's time limit or on preemption, `kill`,
    torchrun stopping its workers. A KeyboardInterrupt, so that it leaves the way Ctrl-C does
    wherever that is handled (the run's log says so, what was saved stays, a `-m` sweep ends,
    Hydra's and other code's `except Exception` let it through); only the words and the exit
    status (128 + the signal's number) differ."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)  # "Terminated: SIGTERM" where shown
        self.signum = signum


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """What kd says, on stderr and in the run's log, when `exc` stopped it."""
    if isinstance(exc, Terminated):
        return f"terminated by {signal.Signals(exc.signum).name}: {RESUME}"
    return INTERRUPTED


def exit_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended: 130 for Ctrl-C
    (SIGINT), 143 for SIGTERM."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


def _raise_terminated(signum: int, frame) -> None:
    # Once: a second SIGTERM, while the first unwinds, ends the process at once, as it did
    # before kd handled it (checkpoints and store entries are written atomically either way).
    signal.signal(signum, signal.SIG_DFL)
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While kd runs, SIGTERM raises Terminated instead of ending the process without a word
    in the run's log (Slurm sends SIGTERM, then SIGKILL some 30 s later). Set in the main
    thread only (Python runs signal handlers there and lets no other thread set them), and
    only over the default action: a SIGTERM the parent process chose to ignore stays ignored,
    as Python leaves an ignored SIGINT. The previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main() -> None:
    try:
        with sigterm_raises():
            dispatch()
    except BrokenPipeError:  # `kd train --help | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit
        sys.exit(1)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        sys.stderr.write(f"\n{interrupted_line(exc)}\n")
        status = exit_status(exc)
        distributed = sys.modules.get("kdcli.distributed")  # imported only if kd got that far
        if distributed is not None:
            distributed.exit_if_one_of_several(status)
        sys.exit(status)


def dispatch() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "help":  # kd help train == kd train --help
        sys.argv[1:] = [sys.argv[2], "--help"]
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        sys.exit(0)
    if sys.argv[1] == "--completion":
        sys.argv[1:] = ["-sc", f"install={sys.argv[2] if len(sys.argv) > 2 else 'bash'}"]
    flag = next((i for i, a in enumerate(sys.argv) if a in COMPLETION_FLAGS), None)
    if flag is not None:  # `kd -sc ...` or `kd <verb> -sc ...`: both mean the whole of kd
        sys.exit(shell_completion(sys.argv[flag + 1:]))
    # `kd train --version` too: Hydra's own flag printed Hydra's version there ("Hydra 1.3.8").
    if sys.argv[1] in ("-V", "--version") or (sys.argv[1] in COMMANDS
                                              and "--version" in sys.argv[2:]):
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
    try:
        run_hydra_app(verb)
    finally:  # also when the sweeper itself gives up (Optuna: every trial failed)
        if FAILED_JOBS:
            failed, ran = len(FAILED_JOBS), len(SWEEP_JOBS)  # a failed job is counted when it ran
            others = "every one" if failed == ran else "the others ran"
            sys.stderr.write(f"error: {failed} of {ran} job(s) of the sweep failed ({others}; "
                             f"each failed folder holds {FAILED}):\n")
            sys.stderr.writelines(f"  {folder}: {message}\n" for folder, message in FAILED_JOBS)
    if FAILED_JOBS:
        sys.exit(1)


def shell_completion(args: list[str]) -> int:
    """`-sc install=SHELL | uninstall=SHELL | query=SHELL` for kd as a whole."""
    request = next((a for a in args if "=" in a), "")
    action, _, shell = request.partition("=")
    if action not in ("install", "uninstall", "query") or not shell:
        sys.stderr.write("error: use kd --completion bash|zsh (or -sc install|uninstall|query="
                         "SHELL)\n")
        return 2
    if action == "query":
        return completion_query(shell)
    if shell in ("bash", "zsh"):
        if action == "install":
            sys.stdout.write((ZSH_PREFIX if shell == "zsh" else "") + BASH_SCRIPT)
        else:
            sys.stdout.write("complete -r kd 2>/dev/null; unset -f _kd_completion\n")
        return 0
    # Other shells (fish): Hydra's own script, registered for `kd`; its queries come back here.
    sys.argv = ["kd", "-sc", request]
    hydra_app("train")()
    return 0


def completion_query(shell: str) -> int:
    """Prints the completions of $COMP_LINE up to $COMP_POINT, as a shell's script asks."""
    line = os.environ.get("COMP_LINE", "")
    point = os.environ.get("COMP_POINT", "")
    line = line[:int(point)] if point.isdigit() else line
    args = line.split()[1:]  # without the program name
    sep = "\n" if shell == "fish" else " "
    if not args or (len(args) == 1 and not line[-1:].isspace()):  # the cursor is on the verb
        prefix = args[0] if args else ""
        verbs = [v for v in (*COMMANDS, *PLAIN_COMMANDS) if v.startswith(prefix)]
        sys.stdout.write(sep.join(verbs) + "\n")
        return 0
    verb = args[0]
    if verb == "store" and (len(args) == 1 or (len(args) == 2 and not line[-1:].isspace())):
        prefix = args[1] if len(args) == 2 else ""
        sys.stdout.write(sep.join(a for a in STORE_ACTIONS if a.startswith(prefix)) + "\n")
        return 0
    if verb not in COMMANDS:  # report/export/store take paths: the shell completes file names
        return 0
    rest = re.sub(r"^\s*\S+\s+\S+\s*", "", line, count=1)
    os.environ["COMP_LINE"] = f"kd {rest}"
    os.environ["COMP_POINT"] = str(len(os.environ["COMP_LINE"]))
    sys.argv = [f"kd {verb}", "-sc", f"query={shell}"]
    hydra_app(verb)()
    return 0


def hydra_app(verb: str):
    """The Hydra entry point of one verb."""
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://kdcli.configs", config_name=f"kd_{verb}")
    def app(cfg):
        return run_command(verb, cfg)

    return app


def run_hydra_app(verb: str) -> None:
    """Runs a verb's Hydra app, with kd's one line for Hydra's errors that would mislead: a
    typo'd key (Hydra's advice `+key=value` adds it instead; a real new key still takes `+`)."""
    import hydra._internal.utils as hydra_utils

    # Hydra composes the config inside run_and_report, which prints its errors and exits:
    # the error is read here, on its way there.
    report = hydra_utils.run_and_report

    def run_and_report(func):
        return report(lambda: with_kd_errors(func))

    hydra_utils.run_and_report = run_and_report
    try:
        hydra_app(verb)()
    except ValueError as exc:  # raised before run_and_report: Hydra's bare traceback
        if not str(exc).startswith("Only one of --run, --multirun, --cfg"):
            raise
        given = {arg.split("=")[0] for arg in sys.argv}  # --cfg=job too
        if {"-m", "--multirun"} & given and {"-c", "--cfg"} & given:
            # Without -m a swept value (a=1,2) is refused too: hence one value per key.
            sys.stderr.write("error: --cfg shows one job's config: drop -m and give each swept "
                             "key one value (or see the sweeper's settings with --cfg hydra -p "
                             "hydra.sweeper, without -m)\n")
        else:
            sys.stderr.write("error: give one of --run, --multirun (-m), --cfg, --info\n")
        sys.exit(2)
    finally:
        hydra_utils.run_and_report = report


def with_kd_errors(func):
    """`func()`, with a key that is not in the config (a typo) reported in kd's one line, and
    kd's errors that reach it: a sweep job's in another process, which Hydra's sweeper raises
    here (a folder another kd process is writing: kdcli.callbacks.hold_job_folder)."""
    from hydra.errors import ConfigCompositionException

    from kdcli.errors import KDError

    try:
        return func()
    except ConfigCompositionException as exc:
        line = unknown_key_line(exc) or unknown_option_line(exc)
        if line is None:
            raise
        sys.stderr.write(f"error: config: {line}\n")
        sys.exit(1)
    except KDError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)


def unknown_key_line(exc: Exception) -> str | None:
    """`loss.temprature: unknown key (valid: temperature, ...; did you mean loss.temperature?)`
    for Hydra's refusal of an override of a key that is not in the config, else None. The
    guesses are kdcli.schema's, as for a `+key=` or a YAML's key the schema refuses."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from kdcli.schema import did_you_mean

    cause = exc.__cause__
    if not (str(exc).startswith("Could not override") and isinstance(
            cause, (ConfigAttributeError, ConfigKeyError)) and "not in struct" in str(cause)):
        return None
    full_key, node = str(cause.full_key), cause.parent_node
    # The node the key was looked up in: its keys, less _target_ and the like (and at the top
    # level Hydra's own node, which is set as hydra.KEY, not KEY).
    valid = [str(k) for k in (node.keys() if node is not None else ())
             if not (str(k).startswith("_") and str(k).endswith("_"))
             and not (str(k) == "hydra" and "." not in full_key)]
    guess = did_you_mean(node, full_key, valid) if node is not None else ""
    return f"{full_key}: unknown key (valid: {', '.join(valid) or 'none'}{guess})" + \
        sweep_hint(full_key)


def unknown_option_line(exc: Exception) -> str | None:
    """`student=resnet9: no such option (did you mean resnet8, resnet18?; options: ...)` for
    Hydra's refusal of a group option that does not exist, else None. Hydra's own text is 35
    lines for the shipped students (every option on a line, its config search path, and
    HYDRA_FULL_ERROR advice), the only bad input that was not one line."""
    import difflib

    from hydra.errors import MissingConfigException

    if not (isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file
            and "/" in str(exc.missing_cfg_file)):
        return None
    group, _, option = str(exc.missing_cfg_file).rpartition("/")
    options = sorted(map(str, exc.options))
    close = difflib.get_close_matches(option, options, n=3)
    guess = f"did you mean {', '.join(close)}?; " if close else ""
    return (f"{group}={option}: no such option ({guess}options: {', '.join(options)}); one of "
            f"your own: --config-dir DIR with DIR/{group}/{option}.yaml")


def sweep_hint(full_key: str) -> str:
    """Why a `-m` sweep refused a key of a group it sweeps (`loss=hinton,fitnets
    loss.student_layer=block2`), and what to do; "" otherwise. Hydra composes the sweep's first
    config before any job, with the group's option chosen without the sweep (its default), and
    checks the keys set for every job against that option, whatever the jobs choose."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = sys.argv[1:]
    if not {"-m", "--multirun"} & set(args):
        return ""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # noqa: BLE001 - Hydra reports a bad override itself
        return ""
    swept = next((o for o in parsed if o.is_sweep_override() and
                  full_key.startswith(f"{o.package or o.key_or_group}.")), None)
    if swept is None:
        return ""
    given = next((o.input_line for o in parsed if o.key_or_group == full_key), f"{full_key}=...")
    group = swept.package or swept.key_or_group
    return (f"; a -m sweep checks it before any job runs, against the {group} option chosen "
            f"without the sweep (its default), not each of {swept.input_line}: sweep options "
            f"that take other keys in separate runs, or give ++{given.lstrip('+')} (a job whose "
            "option lacks the key then fails alone, the others run)")


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
    except OSError as exc:  # `--out` names a file, a full disk, a folder it may not write
        sys.stderr.write(f"error: {os_error_line(exc)}\n")
        return 1


def os_error_line(exc: OSError) -> str:
    """Disk full, file size limit, permission denied: the file and the reason, no traceback."""
    return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)


def save_run_config(cfg) -> None:
    """The run folder's `.hydra/`: the composed config, Hydra's own and the command-line
    overrides, as Hydra would write them (kd sets `hydra.output_subdir: null` and writes them
    here, inside its error handling)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from kdcli.checkpoint import atomic_write_text

    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", {"hydra": hydra_cfg}),
                       ("overrides.yaml", hydra_cfg.overrides.task)):
        atomic_write_text(folder / name, OmegaConf.to_yaml(node))


def run_command(verb: str, cfg):
    """Runs a verb on a composed config; a KDError becomes a one-line message and exit 1.

    In a `-m` sweep a failed job does not end the sweep (a diverging trial is a normal event in
    a learning-rate or Optuna search): its error goes to stderr, its log and `failed.json` in
    its folder, the remaining jobs run, and `kd` exits 1 at the end. Such a job returns None,
    which the Optuna sweeper records as a failed trial. A sweep job holds its folder's lock
    while it runs, in the process its launcher runs it in (kdcli.callbacks.hold_job_folder);
    a run's is held by kdcli.callbacks.OutputDirCallback.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return run_verb(verb, cfg, sweep=False)
    from kdcli.callbacks import hold_job_folder

    held = hold_job_folder()  # first: before the job writes anything there
    try:
        return run_verb(verb, cfg, sweep=True)
    finally:
        if held is not None:
            held.release()


def run_verb(verb: str, cfg, sweep: bool):
    """`run_command`'s work: the verb's main, its errors reported (a sweep job's recorded)."""
    from hydra.core.hydra_config import HydraConfig

    from kdcli.errors import KDError
    from kdcli.schema import validate

    module = importlib.import_module(COMMANDS[verb][0])
    folder = Path(HydraConfig.get().runtime.output_dir)
    # Under torchrun the first rank alone writes the folder (the process group is not up yet).
    first = os.environ.get("RANK", "0") == "0"
    if sweep:
        SWEEP_JOBS.append(str(folder))
    try:
        if first and verb in SETS_ASIDE:  # this run holds the folder's lock: kdcli.callbacks
            set_aside_earlier_run(folder)
        if first:
            save_run_config(cfg)
        validate(cfg)  # wrong types, unknown keys, ??? values: before any work is done
        result = module.main(cfg)
        # A sweep job's value goes back to the sweep's process (pickled, under submitit):
        # the stage verbs' results hold a Context (locks, open files), which cannot be; only
        # `kd train`'s objective, a number, is of use there (the Optuna sweeper's).
        return result if not sweep or isinstance(result, (int, float)) else None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        # Into the run's log too, which otherwise just stops at the last epoch line; stderr gets
        # the line from `main`, once the interrupt has unwound Hydra. In a `-m` sweep it ends
        # the sweep (Hydra's launcher lets a KeyboardInterrupt through), not just this job.
        log_in_file_only(interrupted_line(exc), level=logging.WARNING)
        raise
    except KDError as exc:
        message = str(exc)
        log_in_file_only(message)
    except OSError as exc:
        message = os_error_line(exc)
        logging.raiseExceptions = False  # the log file may be on the full disk too
        log_in_file_only(message)
    except Exception as exc:
        if not sweep:
            raise  # a bug: Hydra prints the traceback
        log_in_file_only("job failed", exc_info=True)  # the traceback goes to the job's log
        message = f"{type(exc).__name__}: {exc} (traceback in the job's log)"
    sys.stderr.write(f"error: {message}\n")
    if not sweep:
        sys.exit(1)
    record_failure(folder, message)
    return None


class NotOnConsole(logging.Filter):
    """Drops the records marked `console=False` (kd's errors, which stderr shows already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


def log_in_file_only(message: str, exc_info: bool = False, level: int = logging.ERROR) -> None:
    """Logs a record (ERROR unless `level` says otherwise) that the run's log file keeps but
    the terminal does not show: there the `error:` line on stderr is the one line (Hydra's
    console handler printed it a second time, on stdout)."""
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and \
            getattr(handler, "stream", None) in (sys.stdout, sys.stderr)
        if console and not any(isinstance(f, NotOnConsole) for f in handler.filters):
            handler.addFilter(NotOnConsole())
    log.log(level, "%s", message, exc_info=exc_info, extra={"console": False})


def record_failure(folder: Path, message: str) -> None:
    """Notes a failed sweep job: in FAILED_JOBS, and as `failed.json` in its folder (for `kd
    report` and the sweep summary, which list it as failed)."""
    import json

    from kdcli.checkpoint import atomic_write_text

    FAILED_JOBS.append((str(folder), message))
    try:
        atomic_write_text(folder / FAILED, json.dumps({"error": message}) + "\n")
    except OSError as exc:  # e.g. the disk that failed the job: the error is on stderr already
        log.warning("could not write %s: %s", folder / FAILED, exc)


if __name__ == "__main__":
    # `python -m kdcli.cli` (as the tests run kd): run the module that kdcli.* imports, so that
    # they and the jobs see one FAILED_JOBS, not this copy's.
    from kdcli.cli import main as kd_main

    kd_main()
