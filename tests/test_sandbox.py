"""The suite keeps to itself: a user's lab may live on this machine's Redis."""

import subprocess
import sys

import pytest
import redis

from queue_helpers import suite_redis


def test_the_suite_never_reaches_port_6379():
    """tests/sandbox firewalls the default Redis port in pytest and in every process it starts;
    the suite's own redis-server is on a free port, and the Redis tests pass through it."""
    probe = "import socket; socket.create_connection(('127.0.0.1', 6379), timeout=1)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "never connects to port 6379" in proc.stderr, proc.stderr
    with pytest.raises(redis.exceptions.ConnectionError, match="never connects to port 6379"):
        redis.Redis(port=6379, socket_connect_timeout=1, retry_on_error=[]).ping()
    assert suite_redis().port != 6379 and redis.Redis(port=suite_redis().port).ping()
