"""The README stays true: its CLI reference is `--help`, and it lists every config file."""
from __future__ import annotations

from pathlib import Path

from conftest import load_script

REPO = Path(__file__).resolve().parent.parent




def test_readme_cli_reference_equals_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    readme = (REPO / "README.md").read_text()
    assert load_script("update_cli_reference").rendered_readme(readme) == readme, (
        "README.md's CLI reference differs from --help: run python scripts/update_cli_reference.py")


def test_readme_documents_every_config_file():
    readme = (REPO / "README.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in sorted((REPO / "configs").rglob("*.yaml"))
               if f"`{p.relative_to(REPO)}`" not in readme]
    assert not missing, f"config files not described in README.md: {missing}"


def test_every_config_file_parses():
    from detr_ssl.config import parse_args

    for path in sorted((REPO / "configs").rglob("*.yaml")):
        args = parse_args(["--config", str(path), "--backbone_weights", "none"])
        assert args.model
