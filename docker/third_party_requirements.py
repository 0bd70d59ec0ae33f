"""Print the third-party requirements of FedDALE's own packages, one per line.

Why: the images install every third-party dependency into one virtual environment layer that
is identical for all four services (so the ~1 GB of torch and friends is stored and pulled
once), and the offline wheelhouse must hold exactly those wheels. Both read the list from the
packages' pyproject.toml files here, so neither can drift from what the packages declare.
The project's own packages (feddale, feddale-*) are left out: they are built from source,
also when only one service's file is read (the detector's image installs its own, torch-free set).

Usage: python3 third_party_requirements.py [--extras cuda] PYPROJECT...
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 name normalization, so `feddale_core` and `feddale-core` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    return normalize(match.group(1))


def third_party(pyprojects: list[Path], extras: set[str]) -> list[str]:
    """Requirements of the given projects (plus the named extras), minus the projects themselves."""
    if not pyprojects:
        raise ValueError("no pyproject.toml given")
    own: set[str] = set()
    requirements: list[str] = []
    for path in pyprojects:
        with path.open("rb") as fh:
            project = tomllib.load(fh).get("project")
        if not project or "name" not in project:
            raise ValueError(f"{path} has no [project] table with a name")
        own.add(normalize(project["name"]))
        requirements.extend(project.get("dependencies", []))
        for extra in sorted(extras):
            requirements.extend(project.get("optional-dependencies", {}).get(extra, []))
    seen: set[str] = set()
    result = []
    for requirement in requirements:
        name = requirement_name(requirement)
        if name not in own and not _is_feddale(name) and requirement not in seen:
            seen.add(requirement)
            result.append(requirement)
    return result


def _is_feddale(name: str) -> bool:
    return name == "feddale" or name.startswith("feddale-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="", help="comma-separated optional-dependency groups")
    parser.add_argument("pyprojects", nargs="+", type=Path)
    args = parser.parse_args(argv)
    extras = {e.strip() for e in args.extras.split(",") if e.strip()}
    for requirement in third_party(args.pyprojects, extras):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
