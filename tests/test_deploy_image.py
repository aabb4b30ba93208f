"""The container image (deploy/docker/Dockerfile), checked without a Docker engine.

There is no Docker engine on this machine or in CI, so the Dockerfile is parsed and its promises
are checked statically (multi-stage, non-root, a built wheel installed without ``-e``, the
``parley`` entry point running a service the CLI knows), and the builder stage's one real step is
re-enacted: the wheel is built from exactly the files the .dockerignore lets into the context.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from parley.cli.main import SERVICES
from parley.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"
CHART_VALUES = ROOT / "deploy" / "helm" / "parley" / "values.yaml"


@dataclass
class Instruction:
    keyword: str
    args: str

    def json_args(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(a, str) for a in value), self
        return value


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def runs(self) -> str:
        return "\n".join(i.args for i in self.all("RUN"))


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and stages of a Dockerfile (continuation lines joined, comments dropped)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(base=parts[0], name=name, instructions=[]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, got {keyword}"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_multi_stage_from_a_slim_base(dockerfile) -> None:
    args, stages = dockerfile
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert builder.name == "builder" and runtime.name == "runtime"
    for stage in (builder, runtime):
        base = stage.base
        if base.startswith("${"):
            base = args[base.strip("${}")]
        assert base.startswith("python:3.1") and "slim" in base, base
        assert not base.endswith(":latest")
    assert runtime.base != "builder", "the runtime stage starts from a clean base, not from the builder"


def test_builder_builds_the_wheel_and_runtime_installs_it_not_editable(dockerfile) -> None:
    _, stages = dockerfile
    builder, runtime = stages[0], stages[-1]
    assert "pip wheel" in builder.runs() and "/wheels" in builder.runs()
    installs = [i for i in runtime.all("RUN") if "pip install" in i.args]
    assert len(installs) == 1
    install = installs[0].args
    tokens = shlex.split(install.replace("&&", " && "))
    assert "-e" not in tokens and "--editable" not in tokens, "an editable install needs the source tree"
    assert "--no-index" in tokens, "install only the wheels built in the builder stage"
    assert any(t.startswith("--find-links") for t in tokens) and "parley" in tokens
    assert "from=builder" in install or any("--from=builder" in c.args for c in runtime.all("COPY"))
    # No source tree in the runtime image: only the builder copies the project.
    assert not [c for c in runtime.all("COPY") if "--from=" not in c.args]


def test_runtime_runs_as_a_non_root_numeric_user_matching_the_chart(dockerfile) -> None:
    _, stages = dockerfile
    users = stages[-1].all("USER")
    assert users, "the runtime stage must drop root"
    user = users[-1].args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric, so Kubernetes' runAsNonRoot can verify it"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["containerSecurityContext"]["runAsUser"] == int(uid)
    # Nothing after USER switches back.
    after = stages[-1].instructions[stages[-1].instructions.index(users[-1]):]
    assert not [i for i in after if i.keyword == "RUN"], "RUN after USER would need a writable image as that user"


def test_entrypoint_is_parley_and_cmd_a_cli_service(dockerfile) -> None:
    _, stages = dockerfile
    runtime = stages[-1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert entrypoint.json_args() == ["parley"], "exec form, so SIGTERM reaches parley (the drain)"
    (cmd,) = runtime.all("CMD")
    command = cmd.json_args()
    assert len(command) == 1 and command[0] in SERVICES, f"{command} is not one of parley {'|'.join(SERVICES)}"
    assert pyproject()["project"]["scripts"]["parley"] == "parley.cli.main:main"
    # Every service the CLI offers is a valid CMD for this image (the chart runs each with args).
    assert set(SERVICES) == {"gateway", "router", "presence", "transcript"}
    assert runtime.all("STOPSIGNAL")[-1].args == "SIGTERM"


def test_port_and_healthcheck_match_the_service_defaults(dockerfile) -> None:
    _, stages = dockerfile
    runtime = stages[-1]
    default_port = Settings().http_port
    assert [e.args for e in runtime.all("EXPOSE")] == [str(default_port)]
    env = " ".join(e.args for e in runtime.all("ENV"))
    assert f"PARLEY_HTTP_PORT={default_port}" in env
    (health,) = runtime.all("HEALTHCHECK")
    assert "/healthz" in health.args and "PARLEY_HTTP_PORT" in health.args


def test_builder_copies_everything_the_wheel_is_built_from(dockerfile) -> None:
    _, stages = dockerfile
    copied = set()
    for copy in stages[0].all("COPY"):
        parts = [p for p in copy.args.split() if not p.startswith("--")]
        copied.update(p.rstrip("/") for p in parts[:-1])
    project = pyproject()
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied, f"missing from the builder: {needed - copied}"
    for path in copied:
        assert (ROOT / path).exists(), path


# --- .dockerignore: the build context --------------------------------------------------------------
def ignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, line.lstrip("!").rstrip("/")))
    return patterns


def ignored(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or any parent of it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negated, pattern in patterns:
        if pattern.startswith("**/"):
            tail = pattern[3:]
            hit = any(fnmatch.fnmatchcase(p, tail) for p in parts)
        else:
            hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if hit:
            result = not negated
    return result


def build_context(dest: Path) -> list[str]:
    patterns = ignore_patterns()
    # Only the pattern forms `ignored` implements (and Docker agrees on).
    for _, pattern in patterns:
        assert "**" not in pattern.replace("**/", "", 1) and "[" not in pattern, pattern
    reincluded = [pattern for negated, pattern in patterns if negated]
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        base = Path(dirpath).relative_to(ROOT).as_posix().removeprefix(".")
        # Skip ignored folders (.venv, .git, ...) unless a `!pattern` reaches inside them.
        dirnames[:] = [
            d for d in dirnames
            if not ignored(f"{base}/{d}".lstrip("/"), patterns)
            or any(p.startswith(f"{base}/{d}".lstrip("/") + "/") for p in reincluded)
        ]
        for filename in filenames:
            rel = f"{base}/{filename}".lstrip("/")
            if ignored(rel, patterns):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target)
            files.append(rel)
    return files


def test_dockerignore_keeps_the_context_small(tmp_path: Path) -> None:
    files = build_context(tmp_path / "ctx")
    tops = {f.split("/")[0] for f in files}
    assert tops <= {"pyproject.toml", "README.md", "shared", "services"}, tops
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert not [f for f in files if f.startswith(("tests/", "deploy/", ".venv/", ".parley/"))]


def test_wheel_builds_from_the_docker_context_alone(tmp_path: Path) -> None:
    """What the builder stage does, on the files the .dockerignore lets in."""
    ctx = tmp_path / "ctx"
    build_context(ctx)
    out = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ctx)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("parley-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "parley = parley.cli.main:main" in entry_points
    for module in ("parley/cli/main.py", "parley/gateway/app.py", "parley/router/service.py",
                   "parley/presence/service.py", "parley/transcript/service.py", "parley/core/config.py"):
        assert module in names, module
