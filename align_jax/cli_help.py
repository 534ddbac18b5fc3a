"""What `align-jax <command> --help` prints, and the names an unknown binding is matched against.

A command's settings are the parameters of its entry function, the fields of the dataclasses
those parameters take (`train_main.optimizer` is an `optim.OptimizerConfig`, bound as
`optim.OptimizerConfig.learning_rate`), and for `align-jax run` the parameters of the recipes
the run files bind (`value_alignment.value_alignment.sft_steps`). Docs come from the
docstrings' Args: (functions) and Attributes: (dataclasses) sections.
"""

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Sequence

_ARG = re.compile(r"^(\s*)([\w, ]+):\s*(.*)$")
_NAMES = re.compile(r"^(\s*)([\w]+(?:,\s*\w+)*),\s*$")  # a name list that wraps: "a, b,"


def arg_docs(doc: str, section: str = "Args") -> dict[str, list[str]]:
    """{parameter: its lines} from a Google-style docstring's Args (or Attributes) section
    ("a, b: text" documents both; a name list may wrap onto the next line)."""
    out: dict[str, list[str]] = {}
    names: list[str] = []
    pending: list[str] = []
    indent = None
    in_args = False
    for line in doc.splitlines():
        if line.strip() == f"{section}:":
            in_args, indent = True, None
            continue
        if not in_args:
            continue
        if line.strip() and not line.startswith(" "):
            break  # the next section (Returns:, Raises:)
        m = _ARG.match(line)
        if m and (indent is None or len(m.group(1)) == indent or pending):
            indent = len(m.group(1)) if not pending else indent
            names = pending + [n.strip() for n in m.group(2).split(",") if n.strip()]
            pending = []
            for n in names:
                out.setdefault(n, []).append(m.group(3))
        elif (w := _NAMES.match(line)) and (indent is None or len(w.group(1)) == indent):
            indent = len(w.group(1))
            pending = [n.strip() for n in w.group(2).split(",")]
        elif line.strip():
            for n in names:
                out[n].append(line.strip())
    return {k: [d for d in v if d] for k, v in out.items()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """One bindable name: `name` as written in gin, its default and its doc lines."""

    name: str
    default: str
    doc: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Group:
    title: str
    settings: tuple[Setting, ...]


def _default(value) -> str:
    return "required" if value is inspect.Parameter.empty or value is dataclasses.MISSING \
        else f"default {value!r}"


def _dataclass_in(annotation) -> type | None:
    """The dataclass an annotation names (also inside `X | None`), else None."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 and isinstance(found[0], type) else None
    return None


def _short(obj) -> str:
    """The gin name of a function or class: its module's last part, then its name."""
    return f"{obj.__module__.rpartition('.')[2]}.{obj.__qualname__}"


def function_groups(fn: Callable, *, skip: Sequence[str] = ()) -> list[Group]:
    """The settings of `fn` and of the dataclasses its parameters take."""
    docs = arg_docs(inspect.getdoc(fn) or "")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: no dataclass fields listed
        hints = {}
    name = _short(fn)
    params = [(p, v) for p, v in inspect.signature(fn).parameters.items() if p not in skip]
    groups = [Group(title=f"parameters of {fn.__module__}.{fn.__qualname__} (bind with "
                          f"--gin_param='{name}.NAME=VALUE')",
                    settings=tuple(Setting(name=f"{name}.{p}", default=_default(v.default),
                                           doc=tuple(docs.get(p, ())))
                                   for p, v in params))]
    for p, _ in params:
        cls = _dataclass_in(hints.get(p))
        if cls is None:
            continue
        fields = arg_docs(inspect.getdoc(cls) or "", "Attributes")
        if not fields:  # a record not meant to be bound field by field (ModelConfig)
            continue
        groups.append(Group(
            title=f"fields of {cls.__module__}.{cls.__qualname__}, what {name}.{p} takes "
                  f"(bind with --gin_param='{_short(cls)}.NAME=VALUE')",
            settings=tuple(Setting(name=f"{_short(cls)}.{f.name}",
                                   default=_default(f.default), doc=tuple(fields.get(f.name, ())))
                           for f in dataclasses.fields(cls) if f.init)))
    return groups


_IMPORT = re.compile(r"^\s*from\s+([\w.]+)\s+import\s+(\w+)(?:\s+as\s+(\w+))?\s*$")
_RECIPE = re.compile(r"^\s*recipes\.run\.recipe\s*=\s*@(\w+)\.(\w+)")


def bound_recipes(files: Sequence[str]) -> list[Callable]:
    """The recipe functions that `recipes.run.recipe = @module.fn` lines in `files` bind."""
    found: list[Callable] = []
    for path in files:
        alias: dict[str, str] = {}
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if (m := _IMPORT.match(line)):
                    alias[m.group(3) or m.group(2)] = f"{m.group(1)}.{m.group(2)}"
                elif (m := _RECIPE.match(line)) and m.group(1) in alias:
                    try:
                        fn = getattr(importlib.import_module(alias[m.group(1)]), m.group(2))
                    except (ImportError, AttributeError):
                        continue
                    if fn not in found:
                        found.append(fn)
    return found


def shipped_run_files(root: str) -> list[str]:
    folder = os.path.join(root, "configs", "runs")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".gin"))


def command_groups(entry: Callable, *, recipe_files: Sequence[str] = ()) -> list[Group]:
    """Every group of settings of a command: its entry's, and the recipes' that the files bind."""
    groups = function_groups(entry)
    for recipe in bound_recipes(recipe_files):
        groups += function_groups(recipe, skip=("output_dir",))
    # A dataclass several recipes take (MeshSpec) is listed once.
    seen: set[tuple[Setting, ...]] = set()
    return [g for g in groups if not (g.settings in seen or seen.add(g.settings))]


def format_help(command: str, summary: str, entry: Callable, groups: Sequence[Group]) -> str:
    first = (inspect.getdoc(entry) or summary).splitlines()[0]
    lines = [f"usage: align-jax {command} --gin_file=F [--gin_param='{_short(entry)}.NAME=VALUE']"
             " [--output_dir=D]", "", f"{command}: {first}"]
    for group in groups:
        lines += ["", f"{group.title}:"]
        for s in group.settings:
            lines.append(f"  {s.name.rpartition('.')[2]} ({s.default})")
            lines += [f"      {d}" for d in s.doc]
    return "\n".join(lines)


_NO_PARAM = re.compile(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'")
_NO_IMPORT = re.compile(r"'([\w.]+)' was not provided by an import statement")
_NO_CONFIGURABLE = re.compile(r"No configurable matching '([\w.]+)'")


def _unknown_binding(message: str, param_lines: Sequence[str]) -> str | None:
    """The `selector.param` gin could not bind, from its message (and the --gin_param lines)."""
    if (m := _NO_PARAM.search(message)):
        return f"{m.group(1)}.{m.group(2)}"
    m = _NO_IMPORT.search(message) or _NO_CONFIGURABLE.search(message)
    if not m:
        return None
    for line in param_lines:
        left = line.split("=", 1)[0].strip()
        if left == m.group(1) or left.startswith(m.group(1) + "."):
            return left
    return m.group(1)


def did_you_mean(message: str, param_lines: Sequence[str], groups: Sequence[Group]) -> str:
    """`message`, plus the closest known names when it is about an unknown binding."""
    wrong = _unknown_binding(message, param_lines)
    if wrong is None:
        return message
    names = [s.name for g in groups for s in g.settings]
    param = wrong.rpartition(".")[2]
    # The parameter's own name first (learning_rate -> optim.OptimizerConfig.learning_rate),
    # then the whole name for typos in the selector.
    by_param: dict[str, list[str]] = {}
    for n in names:
        by_param.setdefault(n.rpartition(".")[2], []).append(n)
    close = [n for p in difflib.get_close_matches(param, list(by_param), n=3, cutoff=0.75)
             for n in by_param[p]]
    close = close or difflib.get_close_matches(wrong, names, n=3, cutoff=0.6)
    if not close:
        return message
    return f"{message.rstrip('.')}; did you mean {' or '.join(close[:3])}?"
