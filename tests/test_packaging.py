"""A wheel (a non-editable install) carries the shipped gin files, and gin_utils finds them outside the repository."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from repeat_lm import gin_utils

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
  if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
    pytest.skip("not a git checkout")
  return subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, check=True, capture_output=True,
                        text=True).stdout.split()


@pytest.mark.slow
def test_wheel_ships_every_gin_file(tmp_path):
  files = _tracked_files()
  src = tmp_path / "src"
  for f in files:  # a copy, so that the build writes nothing into the checkout
    (src / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO_ROOT / f, src / f)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(tmp_path / "dist"), str(src)], check=True)
  (wheel,) = (tmp_path / "dist").glob("repeat_lm-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  shipped = {n.split("/data/share/repeat_lm/", 1)[1] for n in names if "/data/share/repeat_lm/" in n}
  gins = {f for f in files if f.startswith("gin/") and f.endswith(".gin")}
  assert gins and gins <= shipped, sorted(gins - shipped)


def test_installed_gin_tree_is_searched(tmp_path, monkeypatch):
  # A wheel install: no checkout beside the package, the gin tree under <prefix>/share/repeat_lm.
  installed = tmp_path / "share" / "repeat_lm"
  shutil.copytree(REPO_ROOT / "gin", installed / "gin")
  monkeypatch.setattr(gin_utils, "REPO_ROOT", tmp_path / "site-packages")
  monkeypatch.setattr(gin_utils, "installed_gin_root", lambda: installed)
  monkeypatch.chdir(tmp_path)
  config = gin_utils.configured_macro(["gin/models/t5_1_1_tiny.gin"], [], "MODEL")
  assert config.module.config.emb_dim == 64
