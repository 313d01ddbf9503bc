"""The deployable stack: docker-compose.yml, the Dockerfile and .dockerignore.

No Docker engine is needed. `docker-compose config` validates the Compose file; the rest is
read as data; and the commands the containers run (migrate's and the worker's `command`, the
API's, the image's HEALTHCHECK) are run here, as they are, with this virtual environment's
executables against a fresh SQLite database. What the image installs (the files that the
builder stage copies, the distributions that pyproject.toml declares) is checked against the
code.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BIN = Path(sys.executable).parent
HPSEARCH_SERVICES = ("migrate", "api", "worker")
INSTALL_DOCKER_COMPOSE = (
    "docker-compose is not installed, so the Compose file cannot be validated: "
    "install Debian's package with `apt-get install -y --no-install-recommends docker-compose` "
    "(or put Docker Compose v2's standalone `docker-compose` on PATH)"
)


# ------------------------------------------------------------------------------------------
# Reading the files
# ------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    """docker-compose.yml as written (YAML merge keys resolved, variables not interpolated)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def depends_on(spec: dict[str, Any]) -> dict[str, str]:
    """Each dependency of a service with its condition (the short list form: service_started)."""
    dependencies = spec.get("depends_on") or {}
    if isinstance(dependencies, list):
        return dict.fromkeys(dependencies, "service_started")
    return {
        name: (value or {}).get("condition", "service_started")
        for name, value in dependencies.items()
    }


def environment(spec: dict[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def seconds(duration: str | int) -> float:
    """A Compose duration (`60s`, `1m30s`, `1h`) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"bad duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_stages(text: str) -> list[list[Instruction]]:
    """The Dockerfile's instructions, one list per stage (before the first FROM: global ARGs)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # Docker drops these, within continuations too
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    stages: list[list[Instruction]] = [[]]
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def final_stage() -> list[Instruction]:
    return dockerfile_stages(DOCKERFILE.read_text())[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [instruction for instruction in stage if instruction.keyword == keyword]
    assert found, f"the final stage of the Dockerfile has no {keyword}"
    return found[-1]  # the last one is the one that counts


def healthcheck_command() -> list[str]:
    """The image's HEALTHCHECK command (exec form), as the container runs it."""
    options, found, command = only(final_stage(), "HEALTHCHECK").args.partition("CMD ")
    assert found, "HEALTHCHECK has no CMD"
    assert all(option.startswith("--") for option in options.split()), options
    command = command.strip()
    assert command.startswith("["), "use the exec form: HEALTHCHECK CMD [...] needs no shell"
    return json.loads(command)


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.keyword == "ENV":
            env |= dict(token.split("=", 1) for token in shlex.split(instruction.args))
    return env


def packages() -> list[str]:
    """The top-level packages that pyproject.toml installs."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in include})


# ------------------------------------------------------------------------------------------
# (1) docker-compose config accepts the file
# ------------------------------------------------------------------------------------------


def docker_compose_config(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail(INSTALL_DOCKER_COMPOSE)
    env_file = tmp_path / "empty.env"  # a developer's .env beside the file must not count
    env_file.write_text("")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HPSEARCH_", "POSTGRES_", "COMPOSE_"))
    }
    return subprocess.run(
        [executable, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"],
        cwd=tmp_path,
        env=env | variables,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.system
def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    result = docker_compose_config(
        tmp_path, HPSEARCH_API_TOKENS="token-1,token-2", POSTGRES_PASSWORD="s3cret"
    )
    assert result.returncode == 0, f"docker-compose config rejected the file:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"postgres", *HPSEARCH_SERVICES}
    assert environment(services["api"])["HPSEARCH_API_TOKENS"] == "token-1,token-2"
    assert "HPSEARCH_API_TOKENS" not in environment(services["worker"])
    # One database for all, with the password that PostgreSQL was given.
    postgres = environment(services["postgres"])
    urls = {environment(services[name])["HPSEARCH_DATABASE_URL"] for name in HPSEARCH_SERVICES}
    assert len(urls) == 1, urls
    url = sqlalchemy.make_url(urls.pop())
    assert url.get_backend_name() == "postgresql"
    assert (url.host, url.port) == ("postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"] == "s3cret"
    assert url.database == postgres["POSTGRES_DB"]


@pytest.mark.system
def test_docker_compose_config_requires_the_api_tokens(tmp_path: Path) -> None:
    result = docker_compose_config(tmp_path)
    assert result.returncode != 0, "the API must not start without HPSEARCH_API_TOKENS"
    assert "HPSEARCH_API_TOKENS" in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------
# (2) the Compose file's structure
# ------------------------------------------------------------------------------------------


def test_postgres_has_a_health_check_and_a_named_volume() -> None:
    postgres = service("postgres")
    assert str(postgres["image"]).startswith("postgres:16")
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))
    volumes = compose().get("volumes") or {}
    data = [v for v in postgres["volumes"] if str(v).endswith(":/var/lib/postgresql/data")]
    assert data, "PostgreSQL's data directory is not on a volume"
    assert data[0].split(":")[0] in volumes, "PostgreSQL's data volume is not a named volume"


def test_migrate_runs_once_after_postgres_is_healthy() -> None:
    migrate = service("migrate")
    assert argv(migrate["command"]) == ["hpsearch", "migrate"]
    assert str(migrate.get("restart", "no")) == "no"
    assert depends_on(migrate) == {"postgres": "service_healthy"}


@pytest.mark.parametrize("name", ["api", "worker"])
def test_api_and_worker_wait_for_the_migration(name: str) -> None:
    dependencies = depends_on(service(name))
    assert dependencies.get("migrate") == "service_completed_successfully"
    assert dependencies.get("postgres") == "service_healthy"


@pytest.mark.parametrize("name", HPSEARCH_SERVICES)
def test_one_image_with_shared_data_and_database(name: str) -> None:
    spec = service(name)
    build = spec.get("build")
    assert (build.get("context") if isinstance(build, dict) else build) in (".", "./")
    assert spec.get("image") == "hpsearch:latest"
    env = environment(spec)
    assert env.get("HPSEARCH_DATA_DIR") == "/data"
    assert "@postgres:5432/" in env["HPSEARCH_DATABASE_URL"]
    volumes = compose().get("volumes") or {}
    data = [v for v in spec.get("volumes", []) if str(v).split(":")[1:2] == ["/data"]]
    assert data and data[0].split(":")[0] in volumes, f"{name}: no named volume on /data"


def test_api_serves_on_all_interfaces_with_required_tokens_and_a_health_check() -> None:
    api = service("api")
    command = argv(api["command"])
    assert command[:2] == ["hpsearch", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8000"
    assert any(str(port).endswith(":8000") for port in api["ports"])
    assert environment(api)["HPSEARCH_API_TOKENS"].startswith("${HPSEARCH_API_TOKENS:?")
    assert api["healthcheck"]["test"] == ["CMD", *healthcheck_command()]


def test_worker_reserves_nvidia_gpus_and_scales() -> None:
    worker = service("worker")
    command = argv(worker["command"])
    assert command[:2] == ["hpsearch", "worker"]
    assert command[command.index("--device") + 1] == "all"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    # `docker compose up --scale worker=N`: no fixed name, no host port.
    assert "container_name" not in worker
    assert "ports" not in worker
    # SIGTERM checkpoints the running trial at the end of its epoch: give it time.
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert seconds(worker.get("stop_grace_period", "10s")) >= 30
    assert worker.get("healthcheck", {}).get("disable") is True  # a worker serves no /healthz


# ------------------------------------------------------------------------------------------
# (3) the Dockerfile and its build context
# ------------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_runs_as_a_non_root_user() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())[1:]
    assert len(stages) >= 2, "the Dockerfile must have a builder stage and a runtime stage"
    final = stages[-1]
    user = only(final, "USER").args.split(":")[0]
    assert user not in ("root", "0"), "the final stage must not run as root"
    copies = [i.args for i in final if i.keyword == "COPY" and i.args.startswith("--from=")]
    assert any("/opt/venv" in args for args in copies), "the runtime stage copies the venv"
    assert not any(i.keyword == "RUN" and "pip install" in i.args for i in final)


def test_dockerfile_health_check_env_port_and_default_command() -> None:
    final = final_stage()
    assert "http://127.0.0.1:8000/healthz" in " ".join(healthcheck_command())
    assert "8000" in only(final, "EXPOSE").args.split()
    env = image_env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("HPSEARCH_DATA_DIR") == "/data"
    serve = ["hpsearch", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert json.loads(only(final, "CMD").args) == serve
    stages = dockerfile_stages(DOCKERFILE.read_text())
    args = {i.args.split("=")[0] for stage in stages for i in stage if i.keyword == "ARG"}
    assert {"TORCH_SPEC", "TORCH_INDEX"} <= args


def builder_copies() -> list[str]:
    """The sources (in the build context) of the builder stage's COPY instructions."""
    builder = dockerfile_stages(DOCKERFILE.read_text())[1]
    sources: list[str] = []
    for instruction in builder:
        if instruction.keyword == "COPY":
            tokens = [t for t in shlex.split(instruction.args) if not t.startswith("--")]
            sources += tokens[:-1]
    return sources


def test_dockerignore_keeps_the_app_and_leaves_out_secrets_and_the_venv() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore should start by excluding everything"
    kept = {p[1:].strip("/") for p in patterns if p.startswith("!")}
    needed = {"pyproject.toml", "README.md", *packages()}
    assert needed <= kept, f"left out of the build context: {needed - kept}"
    assert {src.removeprefix("./").rstrip("/") for src in builder_copies()} <= kept
    assert not kept & {".env", ".venv", ".git", "tests", "hpsearch.db"}


@pytest.mark.system
def test_the_image_installs_every_package_and_the_migrations(tmp_path: Path) -> None:
    """Build the wheel that the builder's `pip install .` builds, from the files it copies."""
    context = tmp_path / "context"
    context.mkdir()
    for source in builder_copies():
        path = REPO / source
        assert path.exists(), f"the Dockerfile copies {source}, which does not exist"
        if path.is_dir():
            shutil.copytree(
                path, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]")
            )
        else:
            shutil.copy2(path, context / source)
    # Offline, with this environment's setuptools: what pyproject.toml packs is the question.
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    command += ["--wheel-dir", str(tmp_path / "dist"), str(context)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("hpsearch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in packages():
        for source in (REPO / package).rglob("*"):
            if source.suffix in (".py", ".mako") and "__pycache__" not in source.parts:
                assert source.relative_to(REPO).as_posix() in names, f"{source} not in the image"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hpsearch = hpsearch.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalized(re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0])


def third_party_imports() -> dict[str, str]:
    """Each third-party top-level module that the packages import (at any depth, lazily too),
    with one file that imports it; imports guarded by `except ImportError` are optional."""
    local = set(packages())
    found: dict[str, str] = {}
    for package in sorted(local):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            optional: set[int] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and any(
                    handler.type is not None
                    and {"ImportError", "ModuleNotFoundError"}
                    & {n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)}
                    for handler in node.handlers
                ):
                    optional |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local | {"__future__"}:
                        found.setdefault(top, path.relative_to(REPO).as_posix())
    return found


def test_the_image_gets_every_distribution_the_code_imports() -> None:
    """The image installs only what pyproject.toml declares (plus the Dockerfile's EXTRAS):
    an import that works here only because the development venv happens to hold the
    distribution fails in the container."""
    stages = dockerfile_stages(DOCKERFILE.read_text())
    extras_arg = [i.args for stage in stages for i in stage if i.keyword == "ARG"]
    extras_value = next((a.split("=", 1)[1] for a in extras_arg if a.startswith("EXTRAS=")), "")
    extras = [e.strip() for e in extras_value.strip("\"'").split(",") if e.strip()]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in extras:
        declared += project["optional-dependencies"][extra]
    # What pip installs for them: the declared distributions and their own requirements.
    installed: set[str] = set()
    pending = [requirement_name(requirement) for requirement in declared]
    while pending:
        name = pending.pop()
        if name in installed:
            continue
        installed.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        pending += [requirement_name(r) for r in requirements if "extra ==" not in r]
    distributions = importlib.metadata.packages_distributions()
    missing = {
        module: path
        for module, path in third_party_imports().items()
        if not {normalized(d) for d in distributions.get(module, [])} & installed
    }
    assert not missing, (
        "imported, but not declared in pyproject.toml's dependencies, so missing from the "
        f"image: {', '.join(f'{module} ({path})' for module, path in sorted(missing.items()))}"
    )


# ------------------------------------------------------------------------------------------
# (4) the image's commands run as they are when executed directly
# ------------------------------------------------------------------------------------------


def local(command: list[str]) -> list[str]:
    """The command with its executable taken from this virtual environment (the image's
    /opt/venv/bin is on PATH)."""
    executable = BIN / command[0]
    assert executable.exists(), f"{executable} does not exist: is the package installed?"
    return [str(executable), *command[1:]]


@pytest.fixture
def deployment(tmp_path: Path) -> dict[str, str]:
    """The environment Compose gives the containers, with SQLite for PostgreSQL and a
    directory here for the /data volume; the working directory is that directory too."""
    data = tmp_path / "data"
    data.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("HPSEARCH_")}
    return env | {
        "HPSEARCH_DATABASE_URL": f"sqlite:///{tmp_path / 'hpsearch.db'}",
        "HPSEARCH_DATA_DIR": str(data),
    }


def run_command(
    command: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        local(command),
        cwd=env["HPSEARCH_DATA_DIR"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def migrate(env: dict[str, str]) -> None:
    result = run_command(argv(service("migrate")["command"]), env)
    assert result.returncode == 0, f"migrate failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.system
def test_commands_migrate_creates_the_schema_and_is_idempotent(
    deployment: dict[str, str],
) -> None:
    migrate(deployment)
    engine = sqlalchemy.create_engine(deployment["HPSEARCH_DATABASE_URL"])
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"studies", "trials"} <= tables, f"Optuna's tables are missing: {tables}"
    assert {"hps_studies", "hps_checkpoints", "hps_alembic_version"} <= tables, tables
    migrate(deployment)  # every `docker compose up` runs it again


@pytest.mark.system
def test_commands_worker_exits_0_when_idle(deployment: dict[str, str]) -> None:
    import torch

    migrate(deployment)
    command = argv(service("worker")["command"])
    if torch.cuda.device_count() == 0:  # `--device all` needs a GPU; the rest runs as it is
        command[command.index("--device") + 1] = "cpu"
    result = run_command([*command, "--idle-exit", "1"], deployment)
    assert result.returncode == 0, f"worker failed:\n{result.stdout}\n{result.stderr}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_port(command: list[str], port: int) -> list[str]:
    return [arg.replace("127.0.0.1:8000/", f"127.0.0.1:{port}/") for arg in command]


@pytest.fixture
def api_server(deployment: dict[str, str], tmp_path: Path) -> Iterator[int]:
    """The api service's command, on a free port; yields the port once /healthz answers 200."""
    migrate(deployment)
    command = argv(service("api")["command"])
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    log = tmp_path / "serve.log"
    env = deployment | {"HPSEARCH_API_TOKENS": "deploy-test-token"}
    with log.open("w") as output:
        process = subprocess.Popen(
            local(command),
            cwd=env["HPSEARCH_DATA_DIR"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 45
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                url = f"http://127.0.0.1:{port}/healthz"
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                    json.loads(response.read())
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"/healthz did not answer 200 in 45 s ({exc}):\n{log.read_text()}")
                time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.system
def test_commands_api_serves_and_passes_the_image_health_check(
    api_server: int, deployment: dict[str, str]
) -> None:
    check = on_port(healthcheck_command(), api_server)
    result = run_command(check, deployment, timeout=30)
    assert result.returncode == 0, f"HEALTHCHECK failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.system
def test_commands_health_check_fails_without_a_server(deployment: dict[str, str]) -> None:
    check = on_port(healthcheck_command(), free_port())
    result = run_command(check, deployment, timeout=30)
    assert result.returncode != 0, "the HEALTHCHECK passes with nothing listening"
