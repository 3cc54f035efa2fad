"""pyproject.toml installs without setuptools' deprecation warnings: a license that is an SPDX
string, and every folder of package data listed as a package."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_license_is_spdx_and_every_static_folder_is_a_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    setuptools = project["tool"]["setuptools"]
    dirs = {"tlm_cli." + ".".join(p.relative_to(ROOT / "cli").parts)
            for p in (ROOT / "cli" / "static").rglob("*") if p.is_dir()} | {"tlm_cli.static"}
    assert dirs <= set(setuptools["packages"]), dirs - set(setuptools["packages"])
    assert all(setuptools["package-data"].get(d) == ["*"] for d in dirs)
