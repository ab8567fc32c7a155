"""What can be checked about the Dockerfiles without a Docker engine.

A small parser (comments, parser directives, line continuations, exec/shell forms) and checks that
each file parses, its stages and COPY sources exist, its entrypoint is a console script pyproject
defines, it installs only its program's extra, and the user-facing programs run as non-root.
"""

from __future__ import annotations

import ast
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
FIRST_PARTY = ("freeze_proxy", "daemon", "webhook", "bounded")

KNOWN = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}  # fmt: skip


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    flags: dict[str, str] = field(default_factory=dict)

    def words(self) -> list[str]:
        """Exec form as its JSON list; shell form split on whitespace."""
        text = self.rest()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value)
            return value
        return text.split()

    def rest(self) -> str:
        return self.args.strip()


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuations joined and `--flag=value` options split off."""
    escape = "\\"
    lines = text.splitlines()
    for line in lines:  # parser directives only at the very top
        match = re.match(r"#\s*(\w+)\s*=\s*(\S+)\s*$", line)
        if not match:
            break
        if match.group(1).lower() == "escape":
            escape = match.group(2)
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker
        if not buffer:
            start = number
        if line.rstrip().endswith(escape):
            buffer.append(line.rstrip()[: -len(escape)])
            continue
        buffer.append(line)
        joined = " ".join(part.strip() for part in buffer if part.strip())
        buffer = []
        keyword, _, args = joined.partition(" ")
        instr = Instruction(keyword.upper(), args, start)
        while instr.keyword in ("COPY", "ADD", "FROM", "RUN") and instr.args.startswith("--"):
            flag, _, remainder = instr.args.partition(" ")
            name, _, value = flag[2:].partition("=")
            instr.flags[name] = value
            instr.args = remainder.strip()
        instructions.append(instr)
    assert not buffer, "file ends inside a line continuation"
    return instructions


@dataclass(frozen=True)
class Image:
    dockerfile: str
    context: str
    script: str | None  # the console script it runs
    extra: str | None  # pip extra it installs
    packages: tuple[str, ...]  # first-party packages it must contain
    root: bool = False


IMAGES = [
    # No extra: the stdlib event loop without OpenSSL is 6.7 MiB lighter per pod than uvloop.
    Image("Dockerfile.proxy", ".", "freeze-proxy", None, ("freeze_proxy",)),
    Image("Dockerfile.daemon", ".", "freeze-daemon", "daemon", ("daemon",), root=True),
    Image("Dockerfile.webhook", ".", "freeze-webhook", "webhook", ("webhook",)),
    Image("examples/sleeptalker/Dockerfile", "examples/sleeptalker", None, None, ()),
]
IDS = [i.dockerfile for i in IMAGES]


def load(image: Image) -> list[Instruction]:
    return parse_dockerfile((ROOT / image.dockerfile).read_text())


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def first_party_imports(package: str) -> set[str]:
    """First-party top-level packages that ``package`` imports (transitively)."""
    seen: set[str] = set()
    todo = [package]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for path in (ROOT / current).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                for name in names:
                    top = name.split(".")[0]
                    if top in FIRST_PARTY:
                        todo.append(top)
    return seen


def test_parser_handles_continuations_comments_and_exec_form() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.11-slim\n"
        "FROM ${BASE} AS build\n"
        "RUN apt-get update \\\n"
        "    # a comment inside\n"
        "    && echo hi\n"
        "COPY --from=build --chown=1:1 /a /b\n"
        'ENTRYPOINT ["prog", "--flag"]\n'
    )
    ins = parse_dockerfile(text)
    assert [i.keyword for i in ins] == ["ARG", "FROM", "RUN", "COPY", "ENTRYPOINT"]
    assert ins[2].args == "apt-get update && echo hi"
    assert ins[3].flags == {"from": "build", "chown": "1:1"} and ins[3].words() == ["/a", "/b"]
    assert ins[4].words() == ["prog", "--flag"]
    with pytest.raises(AssertionError):
        parse_dockerfile("RUN echo \\\n")


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_parses_with_known_instructions(image: Image) -> None:
    instructions = load(image)
    assert instructions
    assert {i.keyword for i in instructions} <= KNOWN
    before_from = [
        i.keyword for i in instructions[: [i.keyword for i in instructions].index("FROM")]
    ]
    assert set(before_from) <= {"ARG"}, "only ARG may come before the first FROM"


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_base_is_pinned_slim_bookworm_and_multistage(image: Image) -> None:
    instructions = load(image)
    args = {
        name: value
        for ins in instructions
        if ins.keyword == "ARG"
        for name, _, value in [ins.rest().partition("=")]
    }
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the final image"
    stages: list[str] = []
    for ins in froms:
        words = ins.words()
        base = words[0]
        ref = re.fullmatch(r"\$\{?(\w+)\}?", base)
        resolved = args.get(ref.group(1), "") if ref else base
        if resolved not in stages:
            assert resolved.startswith("python:3.11-slim-bookworm"), resolved
            assert ":latest" not in resolved
        if len(words) == 3:
            assert words[1].upper() == "AS"
            stages.append(words[2])
    text = (ROOT / image.dockerfile).read_text()
    assert "digest" in text and "@sha256:" in text, "say how to pin the digest"


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_copy_from_stages_and_sources_exist(image: Image) -> None:
    instructions = load(image)
    stages: list[str] = []
    context = ROOT / image.context
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.words()
            if len(words) == 3:
                stages.append(words[2])
        if ins.keyword not in ("COPY", "ADD"):
            continue
        *sources, _dest = ins.words()
        assert sources, f"line {ins.line}: COPY needs a source"
        if "from" in ins.flags:
            assert ins.flags["from"] in stages, f"line {ins.line}: unknown stage {ins.flags}"
            continue
        for source in sources:
            assert not source.startswith(("/", "..")), f"{source} escapes the context"
            if any(ch in source for ch in "*?["):
                continue  # BuildKit allows a wildcard that matches nothing
            assert (context / source).exists(), f"line {ins.line}: {source} not in {context}"


@pytest.mark.parametrize("image", [i for i in IMAGES if i.script], ids=lambda i: i.dockerfile)
def test_entrypoint_is_a_console_script(image: Image) -> None:
    final = final_stage(load(image))
    (entrypoint,) = [i for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint.rest().startswith("["), "exec form: signals reach the program"
    program = entrypoint.words()[0]
    assert program == image.script and program in SCRIPTS
    module, _, _func = SCRIPTS[program].partition(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).exists()
    assert module.split(".")[0] in image.packages


@pytest.mark.parametrize("image", [i for i in IMAGES if i.packages], ids=lambda i: i.dockerfile)
def test_installs_only_its_extra_and_packages(image: Image) -> None:
    instructions = load(image)
    installs = [i for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    assert len(installs) == 1
    if image.extra is None:
        assert 'pip install "."' in installs[0].args
    else:
        assert f'".[{image.extra}]"' in installs[0].args
        assert image.extra in PYPROJECT["project"]["optional-dependencies"]
    copied = {
        word.rstrip("/")
        for i in instructions
        if i.keyword == "COPY" and "from" not in i.flags
        for word in i.words()[:-1]
    }
    needed = set().union(*(first_party_imports(p) for p in image.packages))
    assert needed <= copied, f"missing packages {needed - copied}"
    assert not (set(FIRST_PARTY) - needed) & copied, "copies another program's package"


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_user(image: Image) -> None:
    users = [i.rest() for i in final_stage(load(image)) if i.keyword == "USER"]
    if image.root:
        assert users in ([], ["0"], ["root"]), "the daemon needs root for containerd's socket"
        return
    assert users, "runs as non-root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric so runAsNonRoot can verify it"


def test_sleeptalker_runs_its_app() -> None:
    image = IMAGES[-1]
    final = final_stage(load(image))
    (cmd,) = [i for i in final if i.keyword == "CMD"]
    assert cmd.words() == ["python", "app.py"]
    assert (ROOT / "examples/sleeptalker/app.py").exists()


def test_build_script_builds_every_dockerfile() -> None:
    script = ROOT / "scripts/build_images.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    for image in IMAGES:
        assert image.dockerfile in text
    assert "docker" in text and "build" in text
    makefile = ROOT / "Makefile"
    if makefile.exists():
        assert "scripts/build_images.sh" in makefile.read_text()


def test_config_images_are_what_the_script_builds() -> None:
    """config/ deploys ghcr.io/freeze-proxy/<name>: the script's default REGISTRY and names."""
    text = (ROOT / "scripts/build_images.sh").read_text()
    assert 'REGISTRY="${REGISTRY:-ghcr.io/freeze-proxy}"' in text
    config_text = "\n".join(p.read_text() for p in (ROOT / "config").rglob("*.yaml"))
    for name in ("freeze-proxy", "freeze-daemon", "freeze-webhook", "sleeptalker"):
        assert f'image="{name}"' in text
        assert f"ghcr.io/freeze-proxy/{name}:latest" in config_text


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_a_local_wheelhouse_replaces_the_index(image: Image) -> None:
    """README, "Images": wheels in the context's wheelhouse/ are installed with --no-index, so a
    build needs no index (offline, or behind a TLS-intercepting proxy); without any, the index."""
    instructions = load(image)
    copies = [i for i in instructions if i.keyword == "COPY" and i.words()[0] == "wheelhouse"]
    assert copies and copies[0].words() == ["wheelhouse", "/wheelhouse"]
    (install,) = [i for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    assert install.args.startswith(
        "if ls /wheelhouse/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 "
        "PIP_FIND_LINKS=/wheelhouse; fi && "
    ), install.args
    assert instructions.index(copies[0]) < instructions.index(install)
    ignore = ROOT / image.context / "wheelhouse/.gitignore"
    assert ignore.read_text().splitlines()[-2:] == ["*", "!.gitignore"], "wheels stay uncommitted"
