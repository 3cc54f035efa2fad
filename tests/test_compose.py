"""docker-compose.redis.yml: no Docker engine here, so check the settings it must hold."""

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.redis.yml"


def test_redis_compose_file_persists_authenticates_and_binds_to_localhost():
    spec = yaml.safe_load(COMPOSE.read_text())
    redis = spec["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"  # AOF persistence
    assert "--requirepass" in command and "TLM_REDIS_PASSWORD" in command[command.index("--requirepass") + 1]
    assert redis["ports"] == ["${TLM_REDIS_BIND:-127.0.0.1}:${TLM_REDIS_PORT:-6379}:6379"]
    assert "redis-cli" in redis["healthcheck"]["test"] and redis["healthcheck"]["retries"] > 0
    volume, target = redis["volumes"][0].split(":")
    assert target == "/data" and volume in spec["volumes"]  # a named volume
    assert redis["restart"] == "unless-stopped"
