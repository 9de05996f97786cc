"""The deployment files: deploy/dagster.yaml and the repo-root dagster.yaml pass Dagster's own instance
schema and each configured class's schema (K8sRunLauncher's from dagster-k8s), with their environment
variables resolved; the root one builds a working instance on PostgreSQL; the Helm values serve the module
the Dockerfile serves and carry the same run limits as deploy/dagster.yaml; and no production file
reaches into the local tooling (enrichment_assets.dev)."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._config.validate import validate_config
from dagster._core.instance.config import dagster_instance_config, dagster_instance_config_schema
from dagster._core.launcher import RunLauncher
from dagster._serdes import ConfigurableClassData, class_from_code_pointer
from dagster_k8s import K8sRunLauncher
from dagster_postgres import DagsterPostgresStorage
from sqlalchemy.engine import make_url

from enrichment_assets.defs.io_manager import BASE_PATH_ENV

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MODULE = "enrichment_assets.defs.definitions"
INSTANCE_FILES = [pytest.param(ROOT / "dagster.yaml", id="root"), pytest.param(DEPLOY / "dagster.yaml", id="k8s")]
DUMMY_ENV = {
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "not-a-secret",
    "DAGSTER_PG_HOST": "postgres.invalid",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_PG_PORT": "5432",
}


@pytest.fixture
def dummy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def helm_values() -> dict[str, Any]:
    return load_yaml(DEPLOY / "helm" / "values.yaml")


def user_deployment() -> dict[str, Any]:
    [deployment] = helm_values()["dagster-user-deployments"]["deployments"]
    return deployment


def instance_config(path: Path, tmp_path: Path) -> dict[str, Any]:
    """The file as Dagster loads it from $DAGSTER_HOME, validated against its instance schema."""
    shutil.copy(path, tmp_path / "dagster.yaml")
    config, custom_instance_class = dagster_instance_config(str(tmp_path))
    assert custom_instance_class is None
    return dict(config)


# -- the instance files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", INSTANCE_FILES)
def test_instance_file_passes_dagsters_instance_schema(path: Path, tmp_path: Path, dummy_env: None) -> None:
    raw = load_yaml(path)
    assert validate_config(dagster_instance_config_schema(), raw).success
    config = instance_config(path, tmp_path)
    assert set(config["storage"]) == {"postgres"}, "plain dagster-postgres storage"
    assert "pools" not in config.get("concurrency", {}), "source limits live in the fact store, not in pools"
    assert "concurrency" not in raw or "runs" not in raw["concurrency"], "run limits in run_coordinator only"
    assert config["telemetry"] == {"enabled": False}
    monitoring = config["run_monitoring"]
    assert monitoring["enabled"] and monitoring["max_resume_run_attempts"] == 0
    assert monitoring["poll_interval_seconds"] <= 60, "a killed run worker is marked failed within a minute"


@pytest.mark.parametrize("path", INSTANCE_FILES)
def test_every_configured_class_accepts_its_config_with_the_env_resolved(
    path: Path, tmp_path: Path, dummy_env: None
) -> None:
    config = instance_config(path, tmp_path)
    postgres = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert postgres.success, postgres.errors
    assert postgres.value["postgres_db"]["scheme"] == "postgresql+psycopg2"  # SQLAlchemy 2.1 would pick psycopg 3
    assert postgres.value["postgres_db"]["password"] == DUMMY_ENV["DAGSTER_PG_PASSWORD"]
    for key in ("run_coordinator", "run_launcher", "local_artifact_storage", "compute_logs"):
        if key not in config:
            continue
        # ConfigurableClassData maps the public `dagster.core.*` spelling to Dagster's modules.
        data = ConfigurableClassData(
            config[key]["module"], config[key]["class"], yaml.dump(config[key].get("config", {}))
        )
        klass: Any = class_from_code_pointer(data.module_name, data.class_name)
        processed = process_config(klass.config_type(), config[key].get("config", {}))
        assert processed.success, (key, processed.errors)
        if key != "run_launcher":  # K8sRunLauncher loads a kube config when built; its config is enough
            assert isinstance(data.rehydrate(), klass)


def test_the_kubernetes_instance_launches_a_pod_per_run(tmp_path: Path, dummy_env: None) -> None:
    config = instance_config(DEPLOY / "dagster.yaml", tmp_path)
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert issubclass(K8sRunLauncher, RunLauncher)
    processed = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert processed.success, processed.errors
    value = processed.value
    assert value["env_secrets"] == ["enrichment-env"]
    assert value["resources"]["requests"] and value["resources"]["limits"]["memory"]
    [base_path] = [v.split("=", 1)[1] for v in value["env_vars"] if v.startswith(f"{BASE_PATH_ENV}=")]
    assert re.match(r"^[a-z0-9]+://", base_path), "step outputs where every run pod (and a re-execution) reads them"
    assert "run_launcher" not in load_yaml(ROOT / "dagster.yaml"), "the root instance keeps the default launcher"


def test_root_instance_runs_on_postgres_from_the_environment(
    make_postgres_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_url(make_postgres_database())
    monkeypatch.setenv("DAGSTER_PG_USERNAME", url.username or "postgres")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", url.password or "")
    monkeypatch.setenv("DAGSTER_PG_HOST", url.host or "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_DB", url.database or "")
    monkeypatch.setenv("DAGSTER_PG_PORT", str(url.port or 5432))
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert instance.get_runs_count() == 0
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, dg.QueuedRunCoordinator)
        assert coordinator.dequeue_use_threads and coordinator.dequeue_num_workers == 4
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 8
        assert concurrency.pool_config.default_pool_limit is None
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_resume_run_attempts == 0


# -- Helm values and the image -----------------------------------------------------------------------------


def test_helm_values_serve_the_code_location_over_grpc() -> None:
    values = helm_values()
    deployment = user_deployment()
    assert values["dagster-user-deployments"]["enabled"] is True
    args = deployment["dagsterApiGrpcArgs"]
    assert args[args.index("-m") + 1] == MODULE
    assert deployment["port"] == 3030
    assert {"name": "enrichment-env"} in deployment["envSecrets"]
    assert any(e["name"] == "ENRICHMENT_MAX_RUNS_PER_TYPE" and int(e["value"]) >= 1 for e in deployment["env"])
    [server] = values["dagsterWebserver"]["workspace"]["servers"]
    assert (server["host"], server["port"]) == (deployment["name"], deployment["port"])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dagster"]
    assert (pyproject["module_name"], pyproject["code_location_name"]) == (MODULE, server["name"])
    postgresql = values["postgresql"]
    assert postgresql["enabled"] is False and postgresql["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["generatePostgresqlPasswordSecret"] is False and not postgresql["postgresqlPassword"]


def test_helm_values_match_the_kubernetes_instance(tmp_path: Path, dummy_env: None) -> None:
    """The chart renders its own dagster.yaml from the values; it must say what deploy/dagster.yaml says."""
    values = helm_values()
    instance = instance_config(DEPLOY / "dagster.yaml", tmp_path)
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    expected = instance["run_launcher"]["config"]
    assert [s["name"] for s in launcher["envSecrets"]] == expected["env_secrets"]
    assert launcher["resources"] == expected["resources"]
    assert launcher["failPodOnRunFailure"] is expected["fail_pod_on_run_failure"] is True
    assert launcher["envVars"] == expected["env_vars"]
    code_server_env = {e["name"]: e["value"] for e in user_deployment()["env"]}
    assert f"{BASE_PATH_ENV}={code_server_env[BASE_PATH_ENV]}" in expected["env_vars"]

    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    queue = instance["run_coordinator"]["config"]
    assert queued["maxConcurrentRuns"] == queue["max_concurrent_runs"]
    assert queued["tagConcurrencyLimits"] == queue["tag_concurrency_limits"]
    assert (queued["dequeueNumWorkers"], queued["dequeueIntervalSeconds"]) == (
        queue["dequeue_num_workers"],
        queue["dequeue_interval_seconds"],
    )
    assert values["concurrency"]["enabled"] is False, "its run limits would move out of runCoordinator"

    monitoring = values["dagsterDaemon"]["runMonitoring"]
    assert monitoring["enabled"] is True
    assert monitoring["maxResumeRunAttempts"] == instance["run_monitoring"]["max_resume_run_attempts"]
    assert monitoring["pollIntervalSeconds"] == instance["run_monitoring"]["poll_interval_seconds"]
    assert values["telemetry"]["enabled"] is False


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_serves_the_module_helm_names_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    [cmd] = [json.loads(arg) for op, arg in instructions if op == "CMD"]
    assert not [arg for op, arg in instructions if op == "ENTRYPOINT"], "the chart passes the command as args"
    assert cmd[:3] == ["dagster", "api", "grpc"] or cmd[:3] == ["dagster", "code-server", "start"]
    assert cmd[cmd.index("-m") + 1] == MODULE == user_deployment()["dagsterApiGrpcArgs"][1]
    assert cmd[cmd.index("-p") + 1] == str(user_deployment()["port"])
    [user] = [arg for op, arg in instructions if op == "USER"]
    assert user.split(":")[0] not in {"root", "0"}
    assert str(user_deployment()["podSecurityContext"]["runAsUser"]) == user.split(":")[0]
    assert any(op == "RUN" and "pip install ." in arg for op, arg in instructions)


def test_dockerfile_bakes_in_no_secret() -> None:
    secretive = re.compile(r"TOKEN|PASSWORD|SECRET|DATABASE_URL|ELASTICSEARCH_URL|_KEY\b", re.IGNORECASE)
    for op, arg in dockerfile_instructions():
        if op in {"ENV", "ARG", "LABEL"}:
            assert not secretive.search(arg), f"{op} {arg}"
        if op in {"COPY", "ADD"}:
            assert ".env" not in arg.split() and "*" not in arg, f"{op} {arg} copies more than the package"


# -- production stays free of local tooling -----------------------------------------------------------------


def production_files() -> list[Path]:
    return [ROOT / "dagster.yaml", *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]


def test_production_files_do_not_reference_local_tooling() -> None:
    files = production_files()
    assert DEPLOY / "Dockerfile" in files and DEPLOY / "helm" / "values.yaml" in files
    offenders = [
        str(p.relative_to(ROOT))
        for p in files
        if re.search(r"enrichment_assets[./]dev\b", p.read_text(errors="replace"))
    ]
    assert offenders == [], "production configuration names enrichment_assets.dev (local tooling)"


@pytest.mark.parametrize("path", [p for p in (DEPLOY.rglob("*.yaml")) if p.is_file()], ids=lambda p: p.name)
def test_deploy_yaml_parses(path: Path) -> None:
    assert isinstance(load_yaml(path), dict)
