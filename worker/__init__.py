"""Queue tasks and the ``tlm-worker`` process (installed as the ``tlm_worker`` package)."""
