"""The wheel carries the manifests and recipes inside the package, and nothing top level
named `datasets` or `stages` (that would shadow Hugging Face `datasets`)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"building the wheel failed: {result.stderr[-2000:]}")
    (path,) = out.glob("deeppose-*.whl")
    return path


def test_wheel_holds_manifests_and_recipes_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("deeppose_cli/dataset_manifests/lsp.toml",
                     "deeppose_cli/dataset_manifests/lspet.toml",
                     "deeppose_cli/dataset_manifests/synthetic.toml",
                     "deeppose_cli/dataset_manifests/skeletons/lsp14.toml",
                     "deeppose_cli/dataset_manifests/mpii.toml",
                     "deeppose_cli/dataset_manifests/skeletons/mpii16.toml",
                     "deeppose_cli/dataset_manifests/flic.toml",
                     "deeppose_cli/dataset_manifests/skeletons/flic11.toml",
                     "deeppose_cli/stage_recipes/stage1.toml",
                     "deeppose_cli/stage_recipes/stage2.toml"):
        assert expected in names
    top_level = {n.split("/")[0] for n in names}
    assert not top_level & {"datasets", "stages", "tests", "examples"}, top_level


def test_installed_wheel_finds_manifests_without_the_clone(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    code = ("import deeppose_cli, deeppose_cli.core.manifests as m\n"
            "assert deeppose_cli.__file__.startswith(%r), deeppose_cli.__file__\n"
            "print(m.dataset_names(), m.load_dataset_manifest('lspet').num_joints,"
            " m.load_stage_recipe(2)['sigma'])\n" % str(target))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['flic', 'lsp', 'lspet', 'mpii', 'synthetic'] 14 1.0"
