"""Readers, the mask binarisation rule, pairing, checking and splitting, datalist loading and prepare_data's errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
import torch
from conftest import CVC, KVASIR, needs, read_json, run
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import Compose, LoadImaged
from PIL import Image, ImageFile
from scripts.data import (
    BinarizeMaskd,
    PILTiffReader,
    binarize_mask,
    check_pairs,
    find_pairs,
    load_datalist,
    split_pairs,
    unpaired_masks,
)
from scripts.errors import InputError, user_message


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
    with pytest.raises(InputError, match=r"mask masks/a.png is 5×8 \(H×W\) but its image frames/a.jpg is 6×8"):
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
    with pytest.raises(InputError, match="images folder .*missing does not exist: check --root, or --images and"):
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


def test_prepare_data_names_a_root_of_no_known_layout(tmp_path, caplog):
    from scripts.prepare_data import main

    assert main(["--root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "none of the known layouts" in caplog.records[-1].getMessage()


def test_official_cvc_layout_with_a_space_in_its_folder_name(tmp_path):
    root = tmp_path / "CVC-ClinicDB"
    _pair(root, "1")
    (root / "images").rename(root / "Original")
    (root / "masks").rename(root / "Ground Truth")
    from scripts.prepare_data import main

    assert main(["--root", str(root), "--output", str(tmp_path / "out"), "--test-fraction", "0",
                 "--val-fraction", "0"]) == 0
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
    from scripts.prepare_data import main

    assert main(["--root", str(tmp_path / "Kvasir-SEG"), "--output", str(tmp_path / "out"), "--split-file", str(split),
                 "--seed", "1"]) == 0
    datalist = read_json(tmp_path / "out" / "datalist.json")
    assert sorted(p["image"].rsplit("/", 1)[1] for p in datalist["test"]) == sorted(test_names)
    assert len(datalist["training"]) + len(datalist["validation"]) == 17 and len(datalist["validation"]) == 2
    assert datalist["summary"]["masks_not_exactly_binary"] == 20  # JPEG masks, binarised by the rule
    assert (tmp_path / "out" / datalist["training"][0]["image"]).resolve().is_file()  # relative to the datalist


# ---- label-index masks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values,lossless,expected", [
    ([0, 1, 2], True, [0, 1, 1]),            # label indices in a PNG: every polyp counts
    ([0, 1, 2], False, [0, 0, 0]),           # the same values from a JPEG: noise on an empty mask
    ([0, 127], True, [0, 1]),                # 127 is still a label index
    ([0, 5, 128, 255], True, [0, 0, 1, 1]),  # above 127: the full-scale rule, lossless or not
])
def test_label_index_rule(values, lossless, expected):
    mask = np.array(values, dtype=np.float32).reshape(1, 1, -1)
    np.testing.assert_array_equal(binarize_mask(mask, lossless=lossless)[0, 0], expected)
    np.testing.assert_array_equal(binarize_mask(torch.as_tensor(mask), lossless=lossless)[0, 0].numpy(), expected)


def _load_pair(image, label):
    """The training pipeline's loading: both files through PILTiffReader, then BinarizeMaskd."""
    return Compose([
        LoadImaged("image", reader=PILTiffReader(mode="RGB"), ensure_channel_first=True),
        LoadImaged("label", reader=PILTiffReader(), ensure_channel_first=True),
        BinarizeMaskd("label"),
    ])({"image": str(image), "label": str(label)})


def test_label_index_masks_are_foreground_wherever_non_zero_unless_stored_as_jpeg(tmp_path):
    _pair(tmp_path, "index")
    labels = np.zeros((12, 20), np.uint8)
    labels[:3], labels[3:6] = 1, 2  # two polyps, as label indices
    Image.fromarray(labels).save(tmp_path / "masks" / "index.png")
    out = _load_pair(tmp_path / "images" / "index.png", tmp_path / "masks" / "index.png")
    assert int(out["label"].sum()) == 6 * 20
    _pair(tmp_path, "noise")
    (tmp_path / "masks" / "noise.png").unlink()
    Image.fromarray(np.full((12, 20), 2, np.uint8)).save(tmp_path / "masks" / "noise.jpg")  # JPEG: stays empty
    out = _load_pair(tmp_path / "images" / "noise.png", tmp_path / "masks" / "noise.jpg")
    assert int(out["label"].sum()) == 0
    summary = check_pairs(find_pairs(tmp_path / "images", tmp_path / "masks"), progress=False)
    assert summary["label_index_masks"] == 1 and summary["empty_masks"] == [str(tmp_path / "masks" / "noise.jpg")]


# ---- EXIF orientation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation,stored", [
    (3, Image.Transpose.ROTATE_180),
    (6, Image.Transpose.ROTATE_90),   # portrait sensor pixels: width and height swap
    (8, Image.Transpose.ROTATE_270),
])
def test_exif_orientation_is_applied_so_that_frame_and_mask_align(tmp_path, orientation, stored):
    # the frame as a viewer shows it, 40 wide and 24 high with a bright polyp top left, and the mask drawn on it
    shown = np.full((24, 40, 3), 30, np.uint8)
    shown[:8, :16] = 220
    mask = np.zeros((24, 40), np.uint8)
    mask[:8, :16] = 255
    # the camera stores other pixels and an Orientation tag that turns them into `shown`
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(shown).transpose(stored).save(tmp_path / "images" / "a.jpg", quality=95, exif=exif)
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    raw = np.asarray(Image.open(tmp_path / "images" / "a.jpg"))
    assert raw.shape != shown.shape or not np.array_equal(raw[..., 0] > 128, mask > 0)  # misaligned unless turned

    out = _load_pair(tmp_path / "images" / "a.jpg", tmp_path / "masks" / "a.png")
    assert out["image"].shape == (3, 40, 24) and out["label"].shape == (1, 40, 24)  # PIL axes (W, H)
    assert torch.equal(out["image"][0] > 128, out["label"][0] > 0)
    assert check_pairs(find_pairs(tmp_path / "images", tmp_path / "masks"), progress=False)["pairs"] == 1
    path = _datalist(tmp_path, {"training": [{"image": "images/a.jpg", "label": "masks/a.png"}]})
    assert len(load_datalist(path, "training")) == 1  # header sizes oriented too


# ---- reader errors through LoadImaged ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,reason", [
    ("truncated.jpg", "it is truncated or corrupt (OSError: image file is truncated"),
    ("garbage.png", "it is not an image file that Pillow or tifffile can read"),
    ("garbage.tif", "it is not an image file that Pillow or tifffile can read"),
    ("deleted.jpg", "it does not exist; restore or replace the file, or remove it from the data."),
])
def test_unreadable_files_end_in_one_sentence_naming_them(tmp_path, name, reason):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"no image here " * 20)
    (tmp_path / "garbage.tif").write_bytes(b"no image here " * 20)
    path = tmp_path / name
    with pytest.raises(InputError, match="cannot read image file"):  # LoadImage lets the reader's error through
        LoadImaged("image", reader=PILTiffReader(mode="RGB"))({"image": str(path)})
    with pytest.raises(Exception) as info:  # Compose wraps it; the bundle's hook finds it in the chain
        Compose([LoadImaged("image", reader=PILTiffReader(mode="RGB"))])({"image": str(path)})
    message = user_message(info.value)
    assert message.startswith(f"cannot read image file {path}: {reason}"), message
    assert "suitable reader" not in message and "\n" not in message


# ---- load_datalist ----------------------------------------------------------------------------------------------


def _datalist(folder, content, name="datalist.json"):
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_load_datalist_returns_what_monai_returns(tmp_path):
    _pair(tmp_path, "a")
    _pair(tmp_path, "b", fmt="jpg")
    entries = [{"image": "images/a.png", "label": "masks/a.png", "fold": 0},
               {"image": "images/b.jpg", "label": "masks/b.png", "note": "images"}]
    path = _datalist(tmp_path, {"training": entries, "validation": [], "summary": {"pairs": 2}})
    assert load_datalist(path, "training", tmp_path) == load_decathlon_datalist(path, True, "training", tmp_path)
    items = load_datalist(path, "training")  # base_dir: the datalist's folder
    assert items[0] == {"image": str(tmp_path / "images" / "a.png"), "label": str(tmp_path / "masks" / "a.png"),
                        "fold": 0}
    assert items[1]["note"] == str(tmp_path / "images")  # an existing path, joined as MONAI does
    assert load_datalist(path, "validation", tmp_path) == []  # training without validation


def _message(*args) -> str:
    with pytest.raises(InputError) as info:
        load_datalist(*args)
    message = str(info.value)
    assert "\n" not in message and user_message(info.value) == message
    return message


def test_load_datalist_names_what_is_wrong_before_training(tmp_path):
    _pair(tmp_path, "a")
    _pair(tmp_path, "b", mask_size=(20, 11))
    good = {"image": "images/a.png", "label": "masks/a.png"}
    (tmp_path / "images" / "junk.png").write_bytes(b"not a png")
    missing = tmp_path / "nowhere" / "datalist.json"
    assert _message(missing, "training", tmp_path) == (
        f"datalist {missing} does not exist; create it with `python -m scripts.prepare_data --images DIR --masks DIR "
        f"--output {missing.parent}` or set --dataset_dir to the folder that holds your datalist.json.")

    path = _datalist(tmp_path, '{\n  "training": [\n    {"image": "images/a.png",,}\n  ]\n}\n')
    assert _message(path, "training").startswith(
        f"datalist {path} is not valid JSON: Expecting property name enclosed in double quotes at line 3, column 30")

    cases = [
        ({"validation": []}, "datalist {} has no key 'training'; it must map 'training' to a list"),
        ({"training": good}, "datalist {} has no list under key 'training'"),
        ({"training": []}, "datalist {} has an empty 'training' list"),
        ({"training": [good, {"image": "images/a.png"}]},
         "entry 1 of 'training' in datalist {} has no 'label' path ({\"image\": \"images/a.png\"})"),
        ({"training": [good, {"image": "images/gone.png", "label": "masks/gone.png"}]},
         (f"image file {tmp_path / 'images' / 'gone.png'} named in datalist {{}} does not exist (and 1 more of its "
          f"files are missing); its paths are relative to {tmp_path}: set --dataset_dir")),
        ({"training": [good, {"image": "images/junk.png", "label": "masks/a.png"}]},
         f"cannot read image file {tmp_path / 'images' / 'junk.png'} named in datalist {{}}: it is not an image file"),
        ({"training": [good, {"image": "images/b.png", "label": "masks/b.png"}]},
         (f"mask {tmp_path / 'masks' / 'b.png'} is 11×20 (H×W) but its image {tmp_path / 'images' / 'b.png'} is "
          "12×20 (datalist {})")),
    ]
    for i, (content, expected) in enumerate(cases):
        path = _datalist(tmp_path, content, f"case{i}.json")
        message = _message(path, "training", tmp_path)
        assert message.startswith(expected.replace("{}", str(path))), message


def test_load_datalist_reads_headers_only(tmp_path, monkeypatch):
    _pair(tmp_path, "a", fmt="jpg")
    tifffile.imwrite(tmp_path / "images" / "t.tif", np.zeros((3, 12, 20), np.uint8), photometric="minisblack",
                     planarconfig="separate")  # (C, H, W) planes, as some TIFF writers store frames
    tifffile.imwrite(tmp_path / "masks" / "t.tif", np.zeros((12, 20), np.uint8))
    path = _datalist(tmp_path, {"training": [{"image": f"images/{n}", "label": f"masks/{m}"}
                                             for n, m in (("a.jpg", "a.png"), ("t.tif", "t.tif"))]})

    def decode(*args, **kwargs):
        raise AssertionError("load_datalist decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", decode)
    assert len(load_datalist(path, "training")) == 2


@needs(KVASIR)
def test_load_datalist_over_every_kvasir_pair_and_the_cvc_tiffs(tmp_path, monkeypatch):
    names = sorted(p.name for p in (KVASIR / "images").iterdir())
    path = _datalist(tmp_path, {"training": [{"image": f"images/{n}", "label": f"masks/{n}"} for n in names]})
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a: pytest.fail("decoded pixels"))
    items = load_datalist(path, "training", KVASIR)  # 1000 pairs: about 0.2 s, headers only
    assert len(items) == 1000 and items[0]["image"] == str(KVASIR / "images" / names[0])
    if CVC.is_dir():
        frames = sorted(p.name for p in (CVC / "images").iterdir())
        entries = [{"image": f"images/{n}", "label": f"masks/{n}"} for n in frames]
        path = _datalist(tmp_path, {"training": entries, "test": [{"image": "images/1.tif",
                                                                      "label": str(KVASIR / "masks" / names[0])}]})
        assert len(load_datalist(path, "training", CVC)) == len(frames)  # TIFFs Pillow cannot open
        assert _message(path, "test", CVC).startswith(f"mask {KVASIR / 'masks' / names[0]} is 529×622 (H×W) but its "
                                                      f"image {CVC / 'images' / '1.tif'} is 288×384")


# ---- prepare_data -----------------------------------------------------------------------------------------------


def test_prepare_data_refuses_an_output_it_cannot_write_before_reading_any_pair(tmp_path, caplog):
    """In this process (the command's last line on stderr: test_prepare_data_cli_reports_errors_with_exit_code_2)."""
    from scripts.prepare_data import main

    _pair(tmp_path, "a")
    (tmp_path / "images" / "a.png").write_bytes(b"corrupt")  # reading the pairs would fail on this
    (tmp_path / "taken").write_text("")
    args = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")]
    for output, expected in (
        (tmp_path / "taken",
         f"--output {tmp_path / 'taken'} is an existing file: pass --output a folder (it is created if missing)."),
        (tmp_path / "taken" / "sub",
         (f"--output {tmp_path / 'taken' / 'sub'} lies under {tmp_path / 'taken'}, which is a file: pass --output a "
          "folder (it is created if missing).")),
        (tmp_path / "out", f"cannot read image file {tmp_path / 'images' / 'a.png'}: it is not an image file"),
    ):
        caplog.clear()
        assert main([*args, "--output", str(output)]) == 2
        assert caplog.records[-1].getMessage().startswith(f"error: {expected}"), caplog.text
    assert not (tmp_path / "out" / "datalist.json").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_prepare_data_refuses_an_unwritable_output(tmp_path):
    _pair(tmp_path, "a")
    (tmp_path / "locked").mkdir(mode=0o500)
    proc = run("-m", "scripts.prepare_data", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
               "--output", str(tmp_path / "locked" / "out"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --output {tmp_path / 'locked' / 'out'} is not writable (no write permission on "
        f"{tmp_path / 'locked'}): pass --output another folder.")


def test_prepare_data_names_masks_without_an_image(tmp_path, caplog):
    from scripts.prepare_data import main

    _pair(tmp_path, "a")
    _pair(tmp_path, "b")
    (tmp_path / "images" / "b.png").unlink()
    assert unpaired_masks(tmp_path / "images", tmp_path / "masks") == [tmp_path / "masks" / "b.png"]
    with caplog.at_level("INFO", logger="prepare_data"):
        assert main(["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--output",
                     str(tmp_path / "out"), "--test-fraction", "0", "--val-fraction", "0"]) == 0
    assert "1 masks without an image (left out)" in caplog.text
    assert (f"warning: mask {tmp_path / 'masks' / 'b.png'} has no image of the same stem in {tmp_path / 'images'} "
            "(left out)") in caplog.messages
    summary = read_json(tmp_path / "out" / "datalist.json")["summary"]
    assert summary["masks_without_image"] == [str(tmp_path / "masks" / "b.png")] and summary["pairs"] == 1
