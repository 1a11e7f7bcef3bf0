"""docs/models.md's "Steer a pipeline ht has no spec for" runs as written: its bash block,
executed in an empty folder with `ht` as `python -m htcli` from this checkout, offline."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Steer a pipeline ht has no spec for"


def section_script() -> str:
    """The first ```bash block of the section."""
    text = (ROOT / "docs" / "models.md").read_text()
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.search(r"^```bash\n(.*?)^```", body, re.S | re.M).group(1)


def test_the_section_has_a_script_that_saves_a_pipeline_and_steers_it():
    script = section_script()
    assert "save_pretrained('my-pipeline')" in script
    assert [line.split()[1] for line in script.splitlines() if line.startswith("ht ")] == [
        "plan", "build-dataset", "train-hyper", "steer"]


def _model_paths_supported(folder: Path) -> bool:
    """Whether `get_model` takes a pipeline folder (`--model PATH`), not only spec ids."""
    from htcli.errors import HTError
    from htcli.models import get_model

    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    try:
        get_model(str(folder))
    except HTError as error:
        return not str(error).startswith("unknown model")
    return True


@pytest.mark.slow
def test_the_section_runs_as_written(tmp_path):
    if not _model_paths_supported(tmp_path / "probe"):
        pytest.skip("needs `--model PATH` (a spec derived from a pipeline folder)")
    python = Path(sys.executable)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HT_RUNS": str(tmp_path / "runs"),
           "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}", "HT_RANDOM_WEIGHTS": "0"}
    env.pop("HT_MODEL", None)
    script = f'set -euo pipefail\nht() {{ "{python}" -m htcli "$@"; }}\npython() {{ "{python}" "$@"; }}\n' + section_script()
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    images = list((tmp_path / "runs").rglob("generations/*/0*.png"))
    assert len(images) == 2 and all("my-pipeline" in str(image) for image in images)
