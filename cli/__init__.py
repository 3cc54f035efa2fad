"""The ``tlm`` command line (installed as the ``tlm_cli`` package)."""
