"""The installed packages against the lock (requirements/lock.txt + requirements/no-deps.txt).

scripts/setup.sh installs exactly the lock; every result records whether the environment it ran in still equals it
(`lock` in the result's environment block), and the install test fails under CI=true when it does not.
torch is the one package outside the lock (requirements/torch.txt: the CPU wheel here, a cluster's CUDA build
there), and so are the packages only torch asks for that the lock does not list (a CUDA build's runtime libraries).

    python -m outlierlab.environment --diff      # what differs, one line each; exit 1 if anything does
"""
from __future__ import annotations

import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements"
LOCK_FILES = ("lock.txt", "no-deps.txt")
# Installer tooling a virtualenv brings along (pip freeze hides them too).
TOOLING = {"pip", "wheel"}
OUTSIDE_THE_LOCK = {"torch", "outlierlab"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(directory: Path = REQUIREMENTS) -> dict[str, str]:
    """{canonical name: version} of every `name==version` line in the lock files."""
    pins = {}
    for file in LOCK_FILES:
        for line in (directory / file).read_text().splitlines():
            match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
            if match:
                pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    return {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def _torch_requirements() -> set[str]:
    try:
        requires = metadata.requires("torch") or []
    except metadata.PackageNotFoundError:
        return set()
    return {canonical(re.match(r"[A-Za-z0-9._-]+", spec).group(0)) for spec in requires}


def lock_differences(directory: Path = REQUIREMENTS) -> dict[str, list[str]]:
    """What keeps this environment from being the lock: locked packages missing or at another version, and
    installed packages the lock does not name (torch's own extras aside)."""
    locked, installed = locked_versions(directory), installed_versions()
    exempt = TOOLING | OUTSIDE_THE_LOCK | (_torch_requirements() - set(locked))
    return {
        "missing": sorted(f"{name}=={version}" for name, version in locked.items() if name not in installed),
        "different": sorted(f"{name}: installed {installed[name]}, locked {version}"
                            for name, version in locked.items() if name in installed and installed[name] != version),
        "unlocked": sorted(f"{name}=={version}" for name, version in installed.items()
                           if name not in locked and name not in exempt),
    }


def lock_status() -> dict:
    """For every result record: the lock's hash and whether this environment equals it."""
    if not (REQUIREMENTS / LOCK_FILES[0]).is_file():  # installed as a library, without the repo's lock
        return {"lock": None}
    digest = hashlib.sha256(b"".join((REQUIREMENTS / f).read_bytes() for f in LOCK_FILES)).hexdigest()
    differences = lock_differences()
    return {"lock": {"sha256": digest, "matches": not any(differences.values()),
                     **{key: value for key, value in differences.items() if value}}}


def main(argv: list[str]) -> int:
    if argv != ["--diff"]:
        print("usage: python -m outlierlab.environment --diff", file=sys.stderr)
        return 2
    differences = lock_differences()
    for kind, entries in differences.items():
        for entry in entries:
            print(f"{kind}: {entry}")
    if not any(differences.values()):
        print("this environment equals the lock (torch aside)")
    return 1 if any(differences.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
