"""Every command that README.md, launch/, the run files' headers and the notebooks show runs as
written: `align-jax` commands are parsed and checked (gin files found, bindings known, macros
defined) without running; `--help` and `plan` (without compiling) run; the launch scripts run in
their dry-run mode and the `align-jax` command they would start is checked the same way;
`make` targets exist; `python` scripts and modules exist."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess

import gin
import pytest

from align_jax import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^```(\w*)\s*$")
_PROGRAMS = ("align-jax", "make", "python", "launch/tpu/pod.sh", "sbatch")
_PLACEHOLDER = re.compile(r"<\w[^>]*>|NAME=VALUE|\bX\.gin|=F\b|=D\b")


def _logical_lines(lines: list[str]) -> list[str]:
    """Lines with their `\\` continuations joined."""
    out: list[str] = []
    pending = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out + ([pending] if pending else [])


def _markdown_commands(text: str, where: str) -> list[tuple[str, str]]:
    out = []
    block: list[str] | None = None
    lang = ""
    for line in text.splitlines():
        if (m := _FENCE.match(line.strip())):
            if block is None:
                block, lang = [], m.group(1)
            else:
                if lang in ("", "bash", "sh", "shell"):
                    out += [(where, c) for c in _logical_lines(block)]
                block = None
            continue
        if block is not None:
            block.append(line)
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if span.startswith(("align-jax ", "make ", "python ", "PYTHONPATH=")):
            out.append((where, span))
    return out


def _comment_commands(path: pathlib.Path) -> list[tuple[str, str]]:
    """Commands in a file's leading comment lines (`#   align-jax ...`, `#   launch/...`)."""
    body = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        body.append(line.lstrip("#").strip())
    return [(str(path.relative_to(ROOT)), c) for c in _logical_lines(body)]


def _notebook_commands(path: pathlib.Path) -> list[tuple[str, str]]:
    out = []
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            out += _markdown_commands(src, str(path.relative_to(ROOT)))
        else:
            out += [(str(path.relative_to(ROOT)), line.strip()[1:])
                    for line in _logical_lines(src.splitlines()) if line.strip().startswith("!")]
    return out


def _all_commands() -> list[tuple[str, str]]:
    found = [*_markdown_commands((ROOT / "README.md").read_text(encoding="utf-8"), "README.md"),
             *_markdown_commands((ROOT / "launch" / "README.md").read_text(encoding="utf-8"),
                                 "launch/README.md"),
             *_comment_commands(ROOT / "launch" / "tpu" / "pod.sh"),
             *_comment_commands(ROOT / "launch" / "gpu" / "slurm.sbatch"),
             *[c for p in sorted((ROOT / "configs" / "runs").glob("*.gin"))
               for c in _comment_commands(p)],
             *[c for p in sorted((ROOT / "colab").glob("*.ipynb")) for c in _notebook_commands(p)]]
    out = []
    for where, line in found:
        # One shell line: comments off, `a && b` split, placeholders in prose skipped.
        words = shlex.split(line.replace(" ...", ""), comments=True) if "#" in line else None
        line = shlex.join(words) if words is not None else line.replace(" ...", "")
        for part in line.split("&&"):
            # `[--gin_param=...]` in a usage line: an optional part, left out.
            part = re.sub(r"\s\[[^\]]*\]", "", part).strip()
            words = part.split()
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            program = words[0] if words else ""
            if (program == "export" or program in _PROGRAMS) and not _PLACEHOLDER.search(part):
                out.append((where, part))
    return list(dict.fromkeys(out))


COMMANDS = _all_commands()


def _split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def _exports(where: str) -> dict[str, str]:
    """The variables the `export` lines of the same file set (pod.sh reads its settings so)."""
    env = {}
    for w, line in COMMANDS:
        if w == where and line.startswith("export "):
            env.update(_split_env(shlex.split(line)[1:])[0])
    return env


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _check_align_jax(argv: list[str], capsys, where: str, line: str) -> None:
    if any(a in ("-h", "--help") for a in argv):
        assert cli.main(argv) == 0, f"{where}: {line}"
        assert "usage: align-jax" in capsys.readouterr().out
        return
    argv = [a for a in argv if a != "--overwrite" or argv[0] == "train"]
    code = cli.main(argv, check_only=True)
    err = capsys.readouterr().err
    assert code == 0 and not err, f"{where}: `{line}` does not run as written:\n{err}"
    if argv[0] == "plan":  # cheap: the estimate without compiling
        gin.clear_config()
        code = cli.main([*argv, "--gin_param=plan.plan_main.compile=False"])
        out = capsys.readouterr()
        assert code in (0, 1) and "GiB" in out.out and "fit" in out.out, \
            f"{where}: {line}\n{out.err}"


def _dry_run(script: str, args: list[str], env: dict[str, str], tmp_path) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ALIGN_JAX_")}
    res = subprocess.run(["bash", str(ROOT / script), *args], cwd=ROOT, capture_output=True,
                         text=True, env={**base, "TPU_NAME": "t", "ZONE": "z", **env,
                                         "DRY_RUN": "1", "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, f"{script} {args}: {res.stderr}"
    return res.stdout


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_command_runs_as_written(where, line, capsys, tmp_path):
    if line.startswith("export "):
        return  # settings of the lines after it
    env, words = _split_env(shlex.split(line))
    program = words[0]
    if program == "align-jax":
        _check_align_jax(words[1:], capsys, where, line)
    elif program == "make":
        if shutil.which("make") is None:
            pytest.skip("make is not installed")
        res = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True,
                             text=True)
        assert res.returncode == 0, f"{where}: {line}: {res.stderr}"
        # The target's own align-jax commands, as make would run them.
        printed = "\n".join(_logical_lines(res.stdout.splitlines()))
        for run in re.findall(r"bin/align-jax (.*)", printed):
            gin.clear_config()
            _check_align_jax(shlex.split(run), capsys, f"Makefile ({line})", run)
    elif program == "python":
        target = words[2] if words[1] == "-m" else words[1]
        path = ROOT / (target.replace(".", "/") + ".py" if words[1] == "-m" else target)
        assert path.exists(), f"{where}: {line}: {path} does not exist"
        for arg in words[2 if words[1] != "-m" else 3:]:
            if re.match(r"^[\w/]+\.(ipynb|gin|jsonl)$", arg):
                assert (ROOT / arg).exists(), f"{where}: {line}: {arg} does not exist"
    elif program in ("launch/tpu/pod.sh", "sbatch"):
        script = "launch/tpu/pod.sh" if program != "sbatch" else next(
            w for w in words if w.endswith("slurm.sbatch"))
        args = words[1:] if program != "sbatch" else words[words.index(script) + 1:]
        out = _dry_run(script, args, {**_exports(where), **env}, tmp_path)
        if program == "sbatch" or args[0] == "run":
            srun = next(ln for ln in out.splitlines() if "align-jax" in ln)
            command = srun.split(".venv/bin/align-jax", 1)[1].split(" > ~/")[0]
            _check_align_jax(shlex.split(command), capsys, where, line)
    else:
        pytest.fail(f"{where}: no check for `{line}`")


def test_commands_are_found():
    where = {w for w, _ in COMMANDS}
    assert {"README.md", "launch/README.md", "launch/tpu/pod.sh",
            "launch/gpu/slurm.sbatch"} <= where
    lines = [c for _, c in COMMANDS]
    assert sum(c.startswith("align-jax ") for c in lines) > 30
    assert any(c.startswith("launch/tpu/pod.sh run") for c in lines)
