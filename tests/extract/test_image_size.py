"""--image-size defaults per backbone (448 for resnet101, the papers' setting; the native side for the
others), and `msdn extract` says the size it uses and the file size to expect before it starts."""
import re

from click.testing import CliRunner

import cli
from extract.backbones import default_image_size
from tests.fixtures.folder import cub_folder_dataset


def test_defaults_per_backbone():
    assert default_image_size("resnet101")[0] == 448
    assert default_image_size("efficientnet_lite0")[0] == 224
    assert default_image_size("efficientnet_lite2")[0] == 260
    assert default_image_size("timm:resnet18")[0] == 224  # its pretrained config's input size


def test_extract_says_size_and_bytes_before_it_starts(tmp_path, shared_data, monkeypatch):
    root = cub_folder_dataset(tmp_path / "birds", shared_data, seen=3, unseen=2, per_class=5, vectors=None)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "folder", "--data-root", str(root),
                                           "--backbone", "efficientnet_lite0", "--weights", "random",
                                           "--device", "cpu", "--no-progress", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "folder_efficientnet_lite0_224.h5").is_file()
    lines = result.stderr.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("image size 224 px (efficientnet_lite0's "
                                                                      "default, its native ImageNet size"))
    assert said < next(i for i, line in enumerate(lines) if line.startswith("extracting "))
    # 25 images x 1280 x 7 x 7 float16 = 3.0 MB
    assert re.search(r"1280 x 7 x 7, 25 images -> about 3\.0 MB of float16", lines[said]), lines[said]
