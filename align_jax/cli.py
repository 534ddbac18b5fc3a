"""`align-jax <command> --gin_file=F --gin_param='NAME=VALUE' [--output_dir=D]`.

Each command has one entry function (a plain function; gin binds it through dynamic
registration, so library code carries no decorators). Entries record the gin config, the git
commit and the library versions in their run folder through `align_jax.runinfo`.
"""

import argparse
import importlib
import inspect
import os
import pathlib
import re
import sys

COMMANDS = {
    # command: (module, entry function, one-line help)
    "run": ("align_jax.methods.recipes", "run", "a whole method recipe (SDG, SFT, DPO, eval)"),
    "sdg": ("align_jax.sdg.entry", "sdg_main", "synthetic data generation with a teacher"),
    "train": ("align_jax.train.entry", "train_main", "train one objective (sft/lm/dpo/kto/sami)"),
    "generate": ("align_jax.generate.entry", "generate_main", "sample completions for prompts"),
    "eval": ("align_jax.eval.entry", "eval_main", "evaluate a model"),
    "serve": ("align_jax.generate.server", "serve_main", "OpenAI-compatible HTTP server"),
    "convert": ("align_jax.train.convert", "convert_main",
                "training checkpoint or .gguf -> HF dir"),
    "plan": ("align_jax.train.plan", "plan_main", "per-device memory of a training step"),
    "bench": ("benchmarks.run", "main", "benchmarks"),
}


_IMPORT = re.compile(r"^\s*(from\s+[\w.]+\s+import\s+[\w.]+(\s+as\s+\w+)?|import\s+[\w.]+"
                     r"(\s+as\s+\w+)?)\s*$")
_INCLUDE = re.compile(r"^\s*include\s+['\"](.+)['\"]\s*$")


def _gin_imports(files: list[str], search: list[str], seen: set | None = None) -> list[str]:
    """The import lines of gin files and of the files they include, in order, once each."""
    seen = set() if seen is None else seen
    # Local: `import align_jax.cli` (and `--help`) loads only the standard library modules above.
    from align_jax.ginconf import resolve
    out: list[str] = []
    for name in files:
        path = resolve(name, search)
        if not os.path.isfile(path) or os.path.abspath(path) in seen:
            continue
        seen.add(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for line in f:
                if (m := _INCLUDE.match(line)):
                    out += _gin_imports([m.group(1)], search, seen)
                elif _IMPORT.match(line) and "__gin__" not in line:
                    out.append(line.strip())
    return list(dict.fromkeys(out))


def command_help(command: str, gin_files: list[str] | None = None) -> str:
    """`align-jax <command> --help`: the settings of the command (its entry's parameters, the
    dataclasses they take and, for `run`, the recipes of `gin_files` or of every shipped run
    file), with defaults and docs."""
    from align_jax import cli_help  # local: --help of another command need not import it
    module_name, fn_name, summary = COMMANDS[command]
    entry = getattr(importlib.import_module(module_name), fn_name)
    return cli_help.format_help(command, summary, entry,
                                _groups(command, entry, gin_files or []))


def _groups(command: str, entry, gin_files: list[str]):
    from align_jax import cli_help
    from align_jax.ginconf import all_files, resolve
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    files = []
    if command == "run":
        folders = [root, os.getcwd()]
        files = (all_files([resolve(f, folders) for f in gin_files], folders) if gin_files
                 else cli_help.shipped_run_files(root))
    return cli_help.command_groups(entry, recipe_files=files)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align-jax", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=sorted(COMMANDS),
                   help="; ".join(f"{k}: {v[2]}" for k, v in COMMANDS.items()))
    p.add_argument("--gin_file", action="append", default=[], help="gin file(s), in order")
    p.add_argument("--gin_param", action="append", default=[], help="gin binding(s), last wins")
    p.add_argument("--gin_search_path", action="append", default=[],
                   help="folders searched for gin files and their includes")
    p.add_argument("--output_dir", default=None,
                   help="run folder; bound to the entry's output_dir when given")
    p.add_argument("--traceback", action="store_true",
                   help="show the full stack of an error instead of its one-line message")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that holds a run with other settings")
    p.add_argument("--distributed", action="store_true",
                   help="join the other processes first (multi-host TPU / GPU / SLURM; settings: "
                        "distributed.initialize.* gin bindings or ALIGN_JAX_* variables)")
    return p


def enable_compilation_cache() -> str | None:
    """Keeps compiled programs across runs in `<cache_dir()>/jax` (JAX's persistent cache).

    A second `align-jax` run with the same shapes loads its prefill, decode and train step
    instead of compiling them (tens of seconds each for a 30-layer model on a CPU); so does a
    program compiled again within one run (the aligners recipe's per-criterion aligners). An
    explicit JAX_COMPILATION_CACHE_DIR, or ALIGN_JAX_COMPILATION_CACHE=0, wins.
    Returns the folder used, or None.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or \
            os.environ.get("ALIGN_JAX_COMPILATION_CACHE") == "0":
        return None
    # Local: `align-jax --help` and importing this module stay free of jax.
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from align_jax.models.named import cache_dir  # local: the models package loads flax
    path = os.path.join(cache_dir(), "jax")
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        # JAX decides once per process whether the cache is on: an in-process caller that
        # compiled before (a notebook, a test) gets it from its next compilation on.
        compilation_cache.reset_cache()
    return path


def main(argv: list[str] | None = None, *, check_only: bool = False) -> int:
    """Runs `align-jax <command>`; returns the exit code.

    check_only: parse and check the gin files and bindings (every file found, every binding
    known and of the right type, every macro defined) and return 0 without running anything.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if (argv and argv[0] in COMMANDS and argv[0] != "bench"
            and any(a in ("-h", "--help") for a in argv[1:])):
        files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--gin_file=")]
        print(command_help(argv[0], files))
        return 0
    args, rest = _parser().parse_known_args(argv)
    module_name, fn_name, _ = COMMANDS[args.command]
    if args.command == "bench":
        return importlib.import_module(module_name).main() or 0
    import gin  # local: only a command run needs gin, `--help` stays fast

    from align_jax import ginconf  # local: see _gin_imports
    enable_compilation_cache()
    root = pathlib.Path(__file__).resolve().parent.parent
    folders = ginconf.search_folders(args.gin_search_path, str(root))
    ginconf.install_search_path(folders)
    gin_files = [ginconf.resolve(name, folders) for name in args.gin_file]
    if (missing := ginconf.missing_file(args.gin_file, folders, str(root))):
        print(f"align-jax {args.command}: {missing}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        print(f"align-jax {args.command}: not available in this install ({e})", file=sys.stderr)
        return 2
    entry = getattr(module, fn_name)
    # --gin_param lines are parsed as a config of their own, which sees no imports of the gin
    # files: repeat the entry's module and the files' imports there, so that
    # `entry.train_main.num_steps=5` or `value_alignment.value_alignment.sft_steps=10` bind.
    parent, _, short = module_name.rpartition(".")
    params = ["from __gin__ import dynamic_registration", f"from {parent} import {short}",
              *_gin_imports(gin_files, folders),
              *(["from align_jax import distributed"] if args.distributed else []),
              *args.gin_param]
    if args.output_dir:
        params.append(f"{short}.{fn_name}.output_dir = {args.output_dir!r}")
    if args.overwrite:
        if "overwrite" not in inspect.signature(getattr(module, fn_name)).parameters:
            print(f"align-jax {args.command}: --overwrite applies to train only", file=sys.stderr)
            return 2
        params.append(f"{short}.{fn_name}.overwrite = True")
    try:
        gin.parse_config_files_and_bindings(gin_files, params, finalize_config=False)
    except Exception as e:  # gin raises many types (tokenize.TokenError, TypeError, ...)
        if args.traceback:
            raise
        from align_jax.cli_help import did_you_mean  # local: see _gin_imports
        message = ginconf.parse_error(e, args.gin_param, gin_files, folders)
        message = did_you_mean(message, args.gin_param,
                               _groups(args.command, entry, gin_files))
        print(f"align-jax {args.command}: bad gin configuration: {message}", file=sys.stderr)
        return 2
    bad = ginconf.check_bindings(entry, f"{short}.{fn_name}", gin_files, args.gin_param,
                                 folders)
    if bad:
        print(f"align-jax {args.command}: bad gin configuration: {bad}", file=sys.stderr)
        return 2
    if rest:
        print(f"align-jax {args.command}: unknown arguments {rest}", file=sys.stderr)
        return 2
    ginconf.resolve_repo_paths(str(root))
    if check_only:
        return 0
    if args.distributed:
        from align_jax import distributed  # local: imports numpy, only --distributed needs it
        try:
            try:  # registered only when some binding names it
                start = gin.get_configurable(distributed.initialize)
            except ValueError:
                start = distributed.initialize
            start()
            distributed.check_same_config(distributed.config_text(args.command, gin.config_str()))
        except distributed.DistributedError as e:
            print(f"align-jax {args.command}: {e}", file=sys.stderr)
            return 1
    configured = gin.get_configurable(entry)
    # Local: run_lock imports logging and socket, the train package jax.
    from align_jax import interrupts
    from align_jax.run_lock import RunFolderBusyError
    from align_jax.sdg.teacher import TeacherError
    from align_jax.train.status import EXIT_INTERRUPTED, RunInterrupted
    try:
        # SIGTERM/SIGINT anywhere in the command: exit 75, what was saved is kept.
        with interrupts.honoured():
            result = configured()
            interrupts.check()  # one that an exception handler on the way swallowed
    except RunInterrupted as e:
        message = str(e).split("\n  In call to configurable")[0]
        print(f"align-jax {args.command}: {message} (exit code {EXIT_INTERRUPTED})",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as e:
        if args.traceback:
            raise
        print(f"align-jax {args.command}: interrupted ({str(e) or 'SIGINT'}); what was saved is "
              f"kept; rerun the same command to resume (exit code {EXIT_INTERRUPTED})",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, FloatingPointError, KeyError, TypeError,
            RunFolderBusyError, TeacherError) as e:
        if args.traceback:
            raise
        # gin appends "In call to configurable ..." lines: keep the message itself.
        message = str(e).split("\n  In call to configurable")[0]
        print(f"align-jax {args.command}: {type(e).__name__}: {message}\n"
              f"(rerun with --traceback for the stack)", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
