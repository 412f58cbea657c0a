"""The compose file is valid Compose, and the deployment files and the README name exactly the
variables the code reads."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Read by the container's command line (gunicorn), not by Python.
RUNTIME = {"PORT", "WORKERS", "THREADS"}
# Read by the code but not a deployment setting.
NOT_DEPLOYMENT = {"LAZYXMEM_DATA": "benchmark data folder"}
READS = re.compile(r"""(?:os\.environ(?:\.get)?\(\s*|os\.environ\[\s*|_env_float\(\s*|_env_bool\(\s*|_env_int\(\s*|opt\(\s*)["']([A-Z][A-Z0-9_]+)["']""")


def code_variables() -> set[str]:
    names: set[str] = set()
    for folder in ("lazyxmem_core", "backend"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(READS.findall(path.read_text()))
    return names - set(NOT_DEPLOYMENT)


def dockerfile_env() -> set[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    names: set[str] = set()
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            names |= {tok.split("=", 1)[0] for tok in line.split()[1:] if "=" in tok}
    return names


def test_the_code_reads_the_variables_we_expect():
    names = code_variables()
    assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "DEVICE", "XMEM_CHECKPOINT"} <= names


def test_compose_backend_environment_matches_the_code():
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    env = set(compose["services"]["backend"]["environment"])
    code = code_variables()
    assert code - env == set(), f"read by the code but not settable in compose: {sorted(code - env)}"
    assert env - code - RUNTIME == set(), f"set in compose but read by nothing: {sorted(env - code - RUNTIME)}"


def test_dockerfile_sets_only_variables_that_something_reads():
    env = dockerfile_env()
    assert env, "the Dockerfile sets no ENV"
    unknown = env - code_variables() - RUNTIME - {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PATH"}
    assert unknown == set(), f"Dockerfile ENV read by nothing: {sorted(unknown)}"
    cmd = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD"))
    assert all(f"${{{v}}}" in cmd for v in RUNTIME)


def test_readme_documents_every_variable():
    readme = (ROOT / "README.md").read_text()
    missing = sorted(v for v in code_variables() | RUNTIME if f"`{v}`" not in readme)
    assert missing == [], f"not in the README's configuration table: {missing}"


def test_compose_file_validates_against_the_compose_specification():
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose (Debian package) is installed by `make test` (sysdeps)"
    r = subprocess.run([exe, "-f", str(ROOT / "docker" / "docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    broken = (ROOT / "docker" / "docker-compose.yml").read_text().replace("services:", "servicez:", 1)
    r = subprocess.run([exe, "-f", "-", "config", "-q"], input=broken, capture_output=True, text=True, timeout=60,
                       cwd=ROOT / "docker")
    assert r.returncode != 0  # the check can fail


def test_workers_redis_and_gpus_in_compose():
    services = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())["services"]
    backend, worker = services["backend"], services["worker"]
    assert worker["environment"] == backend["environment"], "a job must run the same way in either process"
    assert worker["command"][:2] == ["lazyxmem", "worker"] and worker["image"] == backend["image"]
    assert backend["environment"]["REDIS_URL"].endswith("redis://redis:6379/0}") and "redis" in services
    for svc in (backend, worker):
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert "GPU_WORKERS" in str(worker["deploy"]["replicas"])
    assert services["label-studio"]["image"].endswith(":1.23.2")


def test_dockerfile_takes_checkpoints_from_build_args_or_mounts_never_from_the_repo():
    text = (ROOT / "Dockerfile").read_text()
    args = set(re.findall(r"^ARG (\w+)", text, re.M))
    assert {"XMEM_VARIANT", "SAM_TYPE", "CUDA_IMAGE"} <= args
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M) and "nvidia/cuda:" in text
    assert "lazyxmem weights download xmem" in text and "lazyxmem weights download sam" in text
    assert "USER lazyxmem" in text and "HEALTHCHECK" in text
    copied = re.findall(r"^COPY (.+) \S+$", text, re.M)
    assert not any(".pth" in c or "models" in c for c in copied)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if f.endswith((".pth", ".pt", ".ckpt"))]
