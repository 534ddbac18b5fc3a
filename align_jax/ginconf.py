"""How the CLI finds gin files and turns gin's errors into one line naming file, line, binding.

Search order for a gin file name (and the names in `include` lines): the folders given with
--gin_search_path, then the installed repository (the shipped `configs/`), then the working
directory. A name that starts with `./`, `../` or `/` is a path and is used as given, so a
`configs/runs/sft_tiny.gin` in the working directory does not shadow the shipped one unless
named `./configs/runs/sft_tiny.gin`.

gin files are trusted code: a binding can import any module and call any function.
"""

import inspect
import io
import os
import re
import tokenize
import types
import typing
from collections.abc import Sequence
from typing import Any

_PATH_PREFIXES = ("./", "../", "/", "~")


def search_folders(extra: Sequence[str], root: str) -> list[str]:
    return [*extra, root, os.getcwd()]


def resolve(name: str, folders: Sequence[str]) -> str:
    """The file a gin name refers to (as given when it is a path or found nowhere)."""
    if name.startswith(_PATH_PREFIXES):
        return os.path.abspath(os.path.expanduser(name))
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return name


def install_search_path(folders: Sequence[str]) -> None:
    """Makes gin look for includes in `folders`, in order, instead of the working dir first."""
    import gin  # local: the CLI imports this module and `--help` stays free of gin
    # gin only appends search prefixes after its built-in '' (the working directory); the
    # list is replaced here so that the shipped configs are found before a same-named file
    # in the working directory.
    prefixes = gin.config._LOCATION_PREFIXES  # noqa: SLF001
    prefixes[:] = list(folders)
    # gin tries every prefix with every reader; its package-resource reader logs
    # "ERROR:root:Path not found" for each miss (and sets up logging as it does): the same
    # check, quiet.
    readers = gin.config._FILE_READERS  # noqa: SLF001
    readers[:] = [(r, _quiet_exists if check.__name__ == "system_path_file_exists" else check)
                  for r, check in readers]


def _quiet_exists(config_path: str) -> bool:
    from gin import resource_reader  # local: see install_search_path
    try:
        path = resource_reader._parse_config_path(config_path)  # noqa: SLF001
    except (ModuleNotFoundError, ValueError, ImportError):
        return False
    return os.path.isfile(path)


def missing_file(names: Sequence[str], folders: Sequence[str], root: str) -> str | None:
    """A one-line message for the first gin file that is nowhere to be found (naming the
    closest shipped ones) or that, or one it includes, is not UTF-8 text."""
    import difflib
    for name in names:
        if os.path.isfile(resolve(name, folders)):
            continue
        shipped = [os.path.relpath(os.path.join(d, f), root)
                   for d, _, files in os.walk(os.path.join(root, "configs"))
                   for f in files if f.endswith(".gin")]
        close = difflib.get_close_matches(name, shipped, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return f"{name}: no such gin file (searched {', '.join(dict.fromkeys(folders))}){hint}"
    for path in all_files(names, folders):
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            return (f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the gin "
                    "file as UTF-8")
    return None


_PREFIX = re.compile(r"^(\w+:)?(?!\w+://)([\w.][^\n:]*)$")


# Only what the repository ships: a `runs/...` output folder left in a checkout must never
# take the place of the user's (an output_dir would be written into the repository).
_SHIPPED = ("examples", "configs")


def _repo_path(value: str, root: str) -> str:
    """`value` with a relative path into the shipped folders (after a `train:`-like prefix)
    that is missing from the working directory but present in the repository made absolute;
    else `value` as it is."""
    m = _PREFIX.match(value)
    if (not m or m.group(2).split("/")[0] not in _SHIPPED
            or os.path.exists(m.group(2))):
        return value
    path = os.path.join(root, m.group(2))
    return f"{m.group(1) or ''}{path}" if os.path.exists(path) else value


def _repo_paths(value, root: str):
    if isinstance(value, str):
        return _repo_path(value, root)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_repo_paths(v, root) for v in value)
    if isinstance(value, dict):
        return {k: _repo_paths(v, root) for k, v in value.items()}
    return value


def resolve_repo_paths(root: str) -> None:
    """Makes the shipped configs' data paths (`examples/sft.jsonl`,
    `train:examples/values_document.md`) work from any working directory: a relative path bound
    in gin that is not in the working directory but is in the repository `root` becomes the
    repository's file. The working directory wins, so a user's own `examples/sft.jsonl` is
    read (unlike gin files, data is the user's before it is ours)."""
    import gin  # local: see install_search_path
    for bindings in gin.config._CONFIG.values():  # noqa: SLF001
        for key, value in bindings.items():
            bindings[key] = _repo_paths(value, root)


_LOCATION = re.compile(r'In (?:file|bindings string) "?([^",\n]*)"?, line (\d+)')


def _unclosed(text: str) -> tuple[int, str] | None:
    """(line, text) of the bracket left open when `text` does not tokenize, else None."""
    opened: list[tuple[int, str]] = []
    lines = text.splitlines()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                opened.append((tok.start[0], tok.string))
            elif tok.type == tokenize.OP and tok.string in ")]}" and opened:
                opened.pop()
    except (tokenize.TokenError, SyntaxError, IndentationError):
        if opened:
            line = opened[-1][0]
            return line, lines[line - 1].strip() if line <= len(lines) else ""
        return len(lines), lines[-1].strip() if lines else ""
    return None


def parse_error(e: BaseException, param_lines: Sequence[str], files: Sequence[str] = (),
                folders: Sequence[str] = ()) -> str:
    """One line for an error raised while gin parsed files and --gin_param bindings."""
    text = str(e)
    where = None
    if isinstance(e, tokenize.TokenError):
        for path in all_files(files, folders):
            with open(path, encoding="utf-8", errors="replace") as f:
                found = _unclosed(f.read())
            if found:
                return f"{path}:{found[0]}: unclosed bracket in `{found[1]}`"
        for line in param_lines:
            if _unclosed(line):
                return f"--gin_param={line!r}: unclosed bracket"
        return f"gin: {e}"
    if isinstance(e, SyntaxError) and e.filename:
        where = f"{e.filename}:{e.lineno}"
        what = e.msg
        line = (e.text or "").strip()
    else:
        found = _LOCATION.findall(text)
        if found:
            file, lineno = found[-1]
            where = f"{file}:{lineno}"
        what = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        line = ""
    if where and where.startswith("<string>") or (where is None and param_lines):
        where = "--gin_param"
    binding = f" in `{line}`" if line else ""
    return f"{where or 'gin'}: {what}{binding}"


def locate(name: str, files: Sequence[str], param_lines: Sequence[str],
           folders: Sequence[str]) -> str:
    """Where a binding `...name = ...` is written: `file:line`, or --gin_param."""
    pattern = re.compile(rf"(^|[./\s]){re.escape(name)}\s*=")
    for line in param_lines:
        if pattern.search(line):
            return f"--gin_param={line.strip()!r}"
    found = None
    for path in all_files(files, folders):
        try:
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if pattern.search(line):
                        found = f"{path}:{i}"  # the last one wins, as in gin
        except OSError:
            continue
    return found or "gin"


def all_files(files: Sequence[str], folders: Sequence[str], seen=None) -> list[str]:
    """`files` and the files they include, includes first, once each."""
    seen = set() if seen is None else seen
    out = []
    for name in files:
        path = resolve(name, folders)
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            includes = re.findall(r"^\s*include\s+['\"](.+)['\"]", f.read(), re.M)
        out += [*all_files(includes, folders, seen), path]
    return out


def _type_ok(value: Any, annotation: Any) -> bool | None:
    """Whether `value` fits a simple annotation; None when the annotation is not checked."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        results = [_type_ok(value, a) for a in typing.get_args(annotation)]
        if any(r is None for r in results):
            return None
        return any(results)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


_MACRO = re.compile(r"%([A-Za-z_][\w./]*)")


def check_macros(files: Sequence[str], param_lines: Sequence[str],
                 folders: Sequence[str]) -> str | None:
    """A one-line message for the first `%NAME` used but never defined."""
    import gin  # local: see install_search_path
    sources = [(f"--gin_param={line!r}", line) for line in param_lines]
    for path in all_files(files, folders):
        with open(path, encoding="utf-8", errors="replace") as f:
            sources += [(f"{path}:{i}", line) for i, line in enumerate(f, 1)]
    for where, line in sources:
        code = line.split("#")[0]
        if re.search(r"['\"]", code):
            code = re.sub(r"'[^']*'|\"[^\"]*\"", "", code)
        for macro in _MACRO.findall(code):
            try:
                gin.query_parameter(f"%{macro}")
            except ValueError:
                return f"{where}: macro %{macro} is not defined (in `{line.strip()}`)"
    return None


def check_bindings(fn, name: str, files: Sequence[str], param_lines: Sequence[str],
                   folders: Sequence[str]) -> str | None:
    """A one-line message for an undefined macro or the first binding of `fn` (gin name
    `name`) of the wrong type."""
    import gin  # local: see install_search_path
    bad = check_macros(files, param_lines, folders)
    if bad:
        return bad
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: nothing to check
        return None
    for param in inspect.signature(fn).parameters:
        try:
            value = gin.query_parameter(f"{name}.{param}")
        except ValueError:
            continue
        if hasattr(value, "__module__") and "gin" in type(value).__module__:
            continue  # a @reference or %macro, resolved at call time
        ok = _type_ok(value, hints.get(param, inspect.Parameter.empty))
        if ok is False:
            where = locate(param, files, param_lines, folders)
            want = getattr(hints[param], "__name__", None) or str(hints[param])
            return (f"{where}: {name}.{param} = {value!r}: expected {want}, got "
                    f"{type(value).__name__}")
    return None
