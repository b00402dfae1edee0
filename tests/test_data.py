"""Readers, the mask binarisation rule, pairing, checking and splitting, and prepare_data's errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from conftest import CVC, KVASIR, needs, read_json, run
from monai.data import MetaTensor
from PIL import Image
from scripts.data import BinarizeMaskd, PILTiffReader, binarize_mask, check_pairs, find_pairs, split_pairs


@pytest.mark.parametrize("values,expected", [
    ([0, 1], [0, 1]),                 # MONAI Label's 0/1
    ([0, 255], [0, 1]),               # public sets' 0/255
    ([3, 120, 130, 251], [0, 0, 1, 1]),  # JPEG artefacts around 0 and 255
    ([0, 5, 9], [0, 0, 0]),           # an empty JPEG mask with noise stays empty
    ([0, 30000, 40000], [0, 0, 1]),   # 16-bit
    ([0.2, 0.6], [0, 1]),             # probabilities
])
def test_binarisation_rule(values, expected):
    mask = np.array(values, dtype=np.float32).reshape(1, 1, -1)
    np.testing.assert_array_equal(binarize_mask(mask)[0, 0], expected)
    np.testing.assert_array_equal(binarize_mask(torch.as_tensor(mask))[0, 0].numpy(), expected)


def test_binarisation_of_colour_and_alpha_masks():
    rgba = np.zeros((4, 2, 2), np.float32)
    rgba[3] = 255  # opaque alpha everywhere must not count as foreground
    rgba[0, 0, 0] = 255  # a pure red pixel does (its luminance, 76, would not)
    np.testing.assert_array_equal(binarize_mask(rgba)[0], [[1, 0], [0, 0]])
    with pytest.raises(ValueError, match="channel-first"):
        binarize_mask(np.zeros((4, 4)))


def test_binarize_transform_names_both_files_on_a_size_mismatch():
    image = MetaTensor(torch.zeros(3, 8, 6), meta={"filename_or_obj": "frames/a.jpg"})
    label = MetaTensor(torch.zeros(1, 8, 5), meta={"filename_or_obj": "masks/a.png"})
    with pytest.raises(ValueError, match=r"mask masks/a.png has spatial size \(8, 5\) but its image frames/a.jpg"):
        BinarizeMaskd("label")({"image": image, "label": label})


def _pair(folder, stem, size=(20, 12), mask_size=None, mask_value=255, fmt="png"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(folder / "images" / f"{stem}.{fmt}")
    w, h = mask_size or size
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2] = mask_value
    Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")


def test_pairs_are_matched_by_stem_and_checked(tmp_path):
    _pair(tmp_path, "a")
    _pair(tmp_path, "b", fmt="bmp")
    _pair(tmp_path, "c", mask_value=0)
    pairs = find_pairs(tmp_path / "images", tmp_path / "masks")
    assert [p["image"].name for p in pairs] == ["a.png", "b.bmp", "c.png"]
    summary = check_pairs(pairs, progress=False)
    assert summary["empty_masks"] == [str(tmp_path / "masks" / "c.png")] and summary["pairs"] == 3


def test_pairing_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="images folder .*missing does not exist"):
        find_pairs(tmp_path / "missing", tmp_path)
    _pair(tmp_path, "a")
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "lonely.jpg")
    with pytest.raises(ValueError, match="1 image.* have no mask .*lonely.jpg"):
        find_pairs(tmp_path / "images", tmp_path / "masks")


def test_corrupt_and_mismatched_files_are_named(tmp_path):
    _pair(tmp_path, "a", mask_size=(20, 11))
    with pytest.raises(ValueError, match=r"mask .*a.png is 11×20 \(H×W\) but its image .*a.png is 12×20"):
        check_pairs(find_pairs(tmp_path / "images", tmp_path / "masks"), progress=False)
    data = (tmp_path / "images" / "a.png").read_bytes()
    (tmp_path / "images" / "a.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"cannot read image .*images/a.png"):
        check_pairs(find_pairs(tmp_path / "images", tmp_path / "masks"), progress=False)


def test_split_is_seeded_and_follows_the_thesis_fractions():
    pairs = [{"image": __import__("pathlib").Path(f"{i:03d}.jpg"), "label": None} for i in range(100)]
    a, b = split_pairs(pairs, seed=3), split_pairs(pairs, seed=3)
    assert a == b and split_pairs(pairs, seed=4) != a
    assert (len(a["training"]), len(a["validation"]), len(a["test"])) == (72, 8, 20)
    names = [p["image"] for part in a.values() for p in part]
    assert sorted(names) == sorted(p["image"] for p in pairs)  # a partition
    by_file = split_pairs(pairs, seed=3, test_names=["005.jpg", "007", ""])
    assert [p["image"].name for p in by_file["test"]] == ["005.jpg", "007.jpg"]
    with pytest.raises(ValueError, match="not among the images: nope"):
        split_pairs(pairs, test_names=["nope.jpg"])


def test_prepare_data_cli_reports_errors_with_exit_code_2(tmp_path):
    _pair(tmp_path, "a", mask_size=(20, 11))
    proc = run("-m", "scripts.prepare_data", "--images", str(tmp_path / "images"), "--masks",
               str(tmp_path / "masks"), "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "a.png is 11×20" in proc.stderr
    assert not (tmp_path / "out" / "datalist.json").exists()
    proc = run("-m", "scripts.prepare_data", "--root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"),
               check=False)
    assert proc.returncode == 2 and "none of the known layouts" in proc.stderr


def test_official_cvc_layout_with_a_space_in_its_folder_name(tmp_path):
    root = tmp_path / "CVC-ClinicDB"
    _pair(root, "1")
    (root / "images").rename(root / "Original")
    (root / "masks").rename(root / "Ground Truth")
    run("-m", "scripts.prepare_data", "--root", str(root), "--output", str(tmp_path / "out"), "--test-fraction", "0",
        "--val-fraction", "0")
    assert len(read_json(tmp_path / "out" / "datalist.json")["training"]) == 1


@needs(CVC)
def test_cvc_tiffs_that_pillow_refuses_are_read_in_the_mask_orientation():
    with pytest.raises(OSError):
        Image.open(CVC / "images" / "1.tif").load()
    reader = PILTiffReader(mode="RGB")
    image, meta = reader.get_data(reader.read(str(CVC / "images" / "1.tif")))
    raw = tifffile.imread(CVC / "images" / "1.tif")  # (H, W, 3), independent of the bundle's reader
    assert image.shape == (384, 288, 3) and tuple(meta["spatial_shape"]) == (384, 288)
    np.testing.assert_array_equal(image, raw.transpose(1, 0, 2))  # PIL convention: (W, H, C)
    mask, _ = PILTiffReader().get_data(PILTiffReader().read(str(CVC / "masks" / "1.tif")))
    assert mask.shape == image.shape[:2]


@needs(KVASIR)
def test_prepare_data_on_kvasir_with_the_pranet_split(tmp_path):
    # a slice of the real release: 20 frames, 3 of them in the PraNet test list
    test_names = (KVASIR.parent / "splits" / "kvasir-seg_pranet_test.txt").read_text().split()[:3]
    names = test_names + sorted(p.name for p in (KVASIR / "images").iterdir() if p.name not in test_names)[:17]
    for sub in ("images", "masks"):
        (tmp_path / "Kvasir-SEG" / sub).mkdir(parents=True)
        for name in names:
            (tmp_path / "Kvasir-SEG" / sub / name).symlink_to(KVASIR / sub / name)
    split = tmp_path / "test.txt"
    split.write_text("\n".join(test_names) + "\n")
    run("-m", "scripts.prepare_data", "--root", str(tmp_path / "Kvasir-SEG"), "--output", str(tmp_path / "out"),
        "--split-file", str(split), "--seed", "1")
    datalist = read_json(tmp_path / "out" / "datalist.json")
    assert sorted(p["image"].rsplit("/", 1)[1] for p in datalist["test"]) == sorted(test_names)
    assert len(datalist["training"]) + len(datalist["validation"]) == 17 and len(datalist["validation"]) == 2
    assert datalist["summary"]["masks_not_exactly_binary"] == 20  # JPEG masks, binarised by the rule
    assert (tmp_path / "out" / datalist["training"][0]["image"]).resolve().is_file()  # relative to the datalist
