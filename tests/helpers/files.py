"""What a refused command must leave as it was: every path under a folder and its bytes."""

from pathlib import Path


def files_under(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` -> its bytes (None for a folder): what a refused command must leave as it was."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
            for path in sorted(folder.rglob("*"))}
