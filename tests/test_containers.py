"""Container recipes and the container wrapping of stages.

Apptainer cannot run here, so: the recipes are parsed (a small parser below), their files must
exist, their pip install lines are run in a fresh virtual environment with ``--dry-run --report``
(proving they resolve and never replace the base image's torch), and the production wrapping path
(:mod:`toolkit.hpc.container` through :class:`toolkit.hpc.executors.LocalExecutor`) really runs a
stage through an ``apptainer`` stand-in that records its arguments and runs the command on the host.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.config import load_config
from toolkit.hpc import container
from toolkit.hpc.executors import LocalExecutor, SlurmExecutor

REPO = Path(__file__).resolve().parents[1]
DEF = REPO / "containers" / "spectrolens.def"
DOCKERFILE = REPO / "containers" / "Dockerfile"
APPTAINER_SECTIONS = {"labels", "help", "files", "environment", "post", "runscript", "test", "setup", "startscript",
                      "arguments", "app*"}


def parse_def(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Apptainer definition -> (header keywords, {section: lines}); raises ValueError on unknown sections
    or header lines after the first section (spython accepts anything, so we check ourselves)."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("%"):
            name = line[1:].split()[0]
            if name not in APPTAINER_SECTIONS:
                raise ValueError(f"line {n}: unknown section %{name}")
            if name in sections:
                raise ValueError(f"line {n}: section %{name} appears twice")
            current = name
            sections[name] = []
        elif current is None:
            s = line.strip()
            if s and not s.startswith("#"):
                if ":" not in s:
                    raise ValueError(f"line {n}: header line without 'Key: value': {s!r}")
                k, v = s.split(":", 1)
                header[k.strip()] = v.strip()
        else:
            sections[current].append(line)
    return header, sections


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile -> [(INSTRUCTION, argument)] with line continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            ins, _, arg = s.partition(" ")
            out.append((ins.upper(), arg.strip()))
    return out


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The ``pip install`` argument lists of shell command lines (split on && and ;)."""
    out = []
    for cmd in commands:
        lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words: list[str] = []
        for tok in [*lex, ";"]:
            if tok in ("&&", ";", "||", "|"):
                if "pip" in words and "install" in words:
                    out.append(words[words.index("install") + 1:])
                words = []
            else:
                words.append(tok)
    return out


def _dry_run(venv: Path, args: list[str], tmp: Path) -> list[str]:
    """Run one recipe pip install in the fresh venv with --dry-run; returns the would-be-installed names."""
    args = [a.replace("/opt/spectrolens", str(REPO)) for a in args if a != "--no-cache-dir"]
    report = tmp / f"report-{abs(hash(tuple(args)))}.json"
    p = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet",
                        "--report", str(report), *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"pip install {' '.join(args)} failed:\n{p.stderr[-3000:]}"
    return [i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]]


def test_apptainer_definition_is_complete():
    header, sec = parse_def(DEF.read_text())
    assert header["Bootstrap"] == "docker"
    assert "pytorch" in header["From"] and "cuda" in header["From"], "needs a CUDA PyTorch base image"
    assert any('spectrolens "$@"' in line for line in sec["runscript"])
    assert any("spectrolens --help" in line for line in sec["test"])
    for line in sec["files"]:
        if line.strip():
            src = line.split()[0]
            assert (REPO / src).exists(), f"%files source {src} is not in the repository"
    installs = pip_installs(sec["post"])
    assert ["--no-cache-dir", "-r", "/opt/spectrolens/requirements/base.txt"] in installs
    assert any("--no-deps" in a and "/opt/spectrolens" in a for a in installs)
    # the pinned torch of the base image must match the one the project is tested with
    setup = (REPO / "scripts" / "setup.sh").read_text()
    pin = re.search(r"torch==([\d.]+)", setup).group(1)
    assert header["From"].split(":")[1].startswith(pin)


def test_dockerfile_matches_the_apptainer_recipe():
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    header, sec = parse_def(DEF.read_text())
    assert ins[0] == ("FROM", header["From"])
    for kind, arg in ins:
        if kind == "COPY":
            for src in arg.split()[:-1]:
                assert (REPO / src).exists(), src
    docker_pip = pip_installs([a for k, a in ins if k == "RUN"])
    assert docker_pip == pip_installs(sec["post"]), "the two recipes must install the same things"
    assert ("ENTRYPOINT", '["spectrolens"]') in ins


def test_recipes_prebuild_the_fused_kernel_where_the_environment_points(tmp_path):
    """The image is read-only at run time, so %post builds the fused CPU kernel and %environment names
    it. Run the recipe's own build line (into a temporary prefix), then load the library the way a
    container process does: from SPECTROLENS_KERNEL_LIB, with nothing compiled at run time."""
    _, sec = parse_def(DEF.read_text())
    env_line = next(line for line in sec["environment"] if "SPECTROLENS_KERNEL_LIB=" in line)
    lib = env_line.split("=", 1)[1].strip()
    build = next(line.strip() for line in sec["post"] if "build_extension(" in line)
    assert "g++" in " ".join(sec["post"])  # the base image has no compiler
    docker = DOCKERFILE.read_text()
    assert f"SPECTROLENS_KERNEL_LIB={lib}" in docker and "build_extension(" in docker
    prefix = str(tmp_path / "opt")
    cmd = shlex.split(build.replace("/opt/spectrolens", prefix))
    out = subprocess.run([sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    built = lib.replace("/opt/spectrolens", prefix)
    assert out.stdout.strip().splitlines()[-1] == built and Path(built).is_file()
    check = subprocess.run([sys.executable, "-c", "from toolkit.model.kernels import kernel_status; "
                            "import json; print(json.dumps(kernel_status()))"], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "SPECTROLENS_KERNEL_LIB": built,
                                                         "TORCH_EXTENSIONS_DIR": str(tmp_path / "none")})
    assert json.loads(check.stdout.strip().splitlines()[-1]) == {"fused": True, "path": built}, check.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_recipe_pip_installs_resolve_in_a_fresh_venv(tmp_path):
    """The recipe's pip lines work against the registry and never pull torch / CUDA wheels
    (the base image's CUDA torch must stay)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    _, sec = parse_def(DEF.read_text())
    names: list[str] = []
    for args in pip_installs(sec["post"]):
        names += _dry_run(venv, args, tmp_path)
    assert "spectrolens" in names and "zarr" in names and "submitit" in names
    assert not [n for n in names if n == "torch" or n.startswith("nvidia-")], names


def _fake_apptainer(bin_dir: Path, record: Path) -> None:
    """Stand-in for the apptainer binary (it cannot exist here): checks the arguments the way
    ``apptainer exec`` parses them, records them, and runs the command on the host."""
    script = bin_dir / "apptainer"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
argv = sys.argv[1:]
assert argv[0] == "exec", argv
i, opts = 1, {{"binds": []}}
while argv[i].startswith("-"):
    if argv[i] == "--bind":
        opts["binds"] += argv[i + 1].split(","); i += 2
    else:
        opts[argv[i]] = True; i += 1
image, cmd = argv[i], argv[i + 1:]
assert os.path.isfile(image), image
for b in opts["binds"]:
    assert os.path.exists(b.split(":")[0]), "bind source missing: " + b
with open({str(record)!r}, "a") as fh:
    fh.write(json.dumps({{"image": image, "opts": opts, "cmd": cmd}}) + "\\n")
if cmd[0] == "python":
    cmd[0] = {sys.executable!r}
os.environ["FAKE_APPTAINER"] = "1"
os.execv(cmd[0], cmd)
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def _cfg(image: Path, data: Path, extra_binds: list[str] | None = None):
    return load_config(None, {
        "data": {"source": "jsonl", "path": str(data), "shard_size": 10, "workers": 1},
        "container": {"image": str(image), "binds": extra_binds or []},
        "executor": {"train": {"tasks_per_node": 2}}})


def test_command_lines(tmp_path, shared_data):
    image = tmp_path / "spectrolens.sif"
    image.write_bytes(b"SIF")
    data = shared_data / "mp_structures" / "mp_structures.jsonl"
    run_dir = tmp_path / "run"
    cfg = _cfg(image, data, ["/scratch:/scratch:ro"])
    prefix = container.exec_prefix(cfg, run_dir)
    assert prefix == ["apptainer", "exec", "--nv", "--bind",
                      f"{run_dir},{data.parent},/scratch:/scratch:ro", str(image)]
    # submitit's python: the same submitit job, started inside the container by srun
    py = container.python_command(cfg, run_dir)
    assert shlex.split(py) == [*prefix, "python"]
    ex = SlurmExecutor(cfg, run_dir)._executor("train", cfg.executor.train, ["41"], "ranks")
    assert ex.python == py
    assert ex._submitit_command_str.startswith(py + " -u -m submitit.core._submit ")
    # missing image: clear error at submission
    with pytest.raises(Exception, match="does not exist"):
        container.exec_prefix(_cfg(tmp_path / "nope.sif", data), run_dir)


def test_local_stage_runs_through_the_container_wrapper(tmp_path, shared_data, monkeypatch):
    """The production path: LocalExecutor -> container.wrap -> `apptainer exec --nv ...` -> the stage."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "apptainer.jsonl"
    _fake_apptainer(bin_dir, record)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    image = tmp_path / "spectrolens.sif"
    image.write_bytes(b"SIF")
    src = tmp_path / "data" / "mp.jsonl"
    src.parent.mkdir()
    lines = (shared_data / "mp_structures" / "mp_structures.jsonl").read_text().splitlines()[:12]
    src.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    cfg = _cfg(image, src)
    from toolkit.config import record_run

    record_run(cfg, run_dir)
    ex = LocalExecutor(cfg, run_dir, run_dir / "config.yaml")
    cmd = ex.command("train")
    assert cmd[:6] == container.exec_prefix(cfg, run_dir) and cmd[6:9] == ["python", "-m", "torch.distributed.run"]
    rc = ex.run_stage("prepare")
    assert rc == 0, (run_dir / "logs" / "prepare" / "prepare.log").read_text()[-3000:]
    calls = [json.loads(x) for x in record.read_text().splitlines()]
    assert len(calls) == 1 and calls[0]["opts"]["--nv"] and calls[0]["image"] == str(image)
    assert calls[0]["opts"]["binds"] == [str(run_dir), str(src.parent)]
    assert calls[0]["cmd"][:4] == ["python", "-m", "toolkit.cli", "prepare"]
    from toolkit.hpc.stages import is_complete

    assert is_complete("prepare", run_dir)
