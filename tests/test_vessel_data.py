"""
Retinal vessel sets as released: CHASE_DB1 (real, when present), DRIVE, STARE and HRF (generated in their layouts),
with FOVs; the TIFF compressions they and the polyp sets use.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import CHASE, needs, read_json
from monai.transforms import Compose, LoadImaged
from PIL import Image
from scipy import ndimage
from scripts.data import BinarizeMaskd, PILTiffReader, find_pairs, load_datalist, split_pairs
from scripts.errors import InputError
from scripts.prepare_data import STARE_SPLIT, find_layout, main, split_layout

# ---- CHASE_DB1 --------------------------------------------------------------------------------------------------


@needs(CHASE)
def test_chase_pairs_and_the_usual_split():
    layout = find_layout(CHASE)  # file names only: no pixel is read
    pairs = [pair for part in layout.parts for pair in find_pairs(**part)]
    assert layout.name == "CHASE_DB1" and len(pairs) == 28
    assert {k: v.name for k, v in pairs[0].items()} == {
        "image": "Image_01L.jpg", "label": "Image_01L_1stHO.png", "label_2nd": "Image_01L_2ndHO.png"}
    splits = split_layout(layout, pairs)
    names = {k: [p["image"].stem for p in v] for k, v in splits.items()}
    first_20 = [f"Image_{child:02d}{eye}" for child in range(1, 11) for eye in "LR"]
    assert names["test"] == [f"Image_{child}{eye}" for child in range(11, 15) for eye in "LR"]
    assert sorted(names["training"] + names["validation"]) == first_20
    assert names["validation"] == ["Image_05L", "Image_05R"]  # seed 0: one child, both eyes
    other = split_layout(layout, pairs, seed=1, val_fraction=0.2)
    children = {p["image"].stem[:-1] for p in other["validation"]}
    assert len(other["validation"]) == 4 and len(children) == 2 and other["test"] == splits["test"]


@needs(CHASE)
def test_prepared_chase_has_fields_of_view_that_cover_the_disc(tmp_path):
    # a symlinked subset keeps this to a second: a typical eye, the one with the most vessel pixels outside its
    # field of view (0.42 %), the smallest disc (65.3 % of the frame) and a test image
    root, out = tmp_path / "CHASE_DB1", tmp_path / "out"
    root.mkdir()
    stems = ("Image_01L", "Image_06L", "Image_08L", "Image_11L")
    for stem in stems:
        for suffix in (".jpg", "_1stHO.png", "_2ndHO.png"):
            (root / f"{stem}{suffix}").symlink_to(CHASE / f"{stem}{suffix}")
    assert main(["--root", str(root), "--output", str(out)]) == 0
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{s}{x}" for s in stems
                                                            for x in (".jpg", "_1stHO.png", "_2ndHO.png"))
    datalist = read_json(out / "datalist.json")
    assert [e["image"].rsplit("/", 1)[1] for e in datalist["test"]] == ["Image_11L.jpg"]
    assert datalist["training"][0]["fov"] == "fov/Image_01L_fov.png"
    summary = datalist["summary"]
    assert summary["layout"] == "CHASE_DB1" and summary["fov"].startswith("derived from the image")
    assert summary["label_outside_fov"] < 0.005
    for entry in load_datalist(out / "datalist.json", "training") + load_datalist(out / "datalist.json", "test"):
        fov = np.asarray(Image.open(entry["fov"]))
        assert set(np.unique(fov)) == {0, 255}
        fov = fov > 0
        grey = np.asarray(Image.open(entry["image"]).convert("L"), np.float32)
        vessels = np.asarray(Image.open(entry["label"])) > 0
        assert ndimage.label(fov)[1] == 1 and ndimage.label(~fov)[1] == 1  # one disc, no hole
        assert 0.64 < fov.mean() < 0.71  # measured on all 28: 0.653-0.697
        assert grey[fov].mean() > 50 and grey[~fov].mean() < 1  # measured: >= 54 inside, <= 0.2 outside
        assert (vessels & ~fov).sum() <= 0.005 * vessels.sum()  # strokes past the edge: at most 0.42 % (06L)


# ---- generated sets in the released layouts ---------------------------------------------------------------------

W, H = 40, 36  # DRIVE's frames are 565×584; the layout, not the size, is tested here


def _disc_and_vessels(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fundus-like frame (bright disc in a dark surround, darker vessels), its vessel mask and its disc."""
    yy, xx = np.mgrid[:H, :W]
    disc = np.hypot(yy - H / 2, xx - W / 2) < 15
    vessels = disc & ((np.abs(yy - xx - seed) < 2) | (np.abs(yy - H / 2 - seed) < 1))
    image = np.zeros((H, W, 3), np.uint8)
    image[disc] = (180, 80, 30)
    image[vessels] = (90, 30, 10)
    return image, vessels, disc


def _gif(mask: np.ndarray, path: Path, flavour: str = "L") -> None:
    """
    A 0/255 mask as a GIF, in one of the palette layouts writers use: ``L`` (Pillow: black index 0, white index 1),
    ``ramp`` (a 256-grey palette, indices 0/255, as DRIVE ships) or ``inverted`` (white index 0, black index 1).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if flavour == "L":
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        return
    if flavour == "ramp":
        image, palette = Image.fromarray(mask.astype(np.uint8) * 255, "P"), [v for g in range(256) for v in (g,) * 3]
    else:
        image, palette = Image.fromarray((~mask).astype(np.uint8), "P"), [255, 255, 255, 0, 0, 0]
    image.putpalette(palette)
    image.save(path)


def _drive(root: Path, training=(21, 22, 23, 24), test=(1, 2)) -> Path:
    """
    DRIVE's official layout, small: LZW-compressed TIFF frames (as released), GIF vessel masks (1st and, for test/,
    2nd observer) and FOVs.
    """
    flavours = ("L", "ramp", "inverted")
    for part, ids in (("training", training), ("test", test)):
        for n, i in enumerate(ids):
            image, vessels, disc = _disc_and_vessels(i % 5)
            (root / part / "images").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / part / "images" / f"{i:02d}_{part}.tif", image, compression="lzw")
            _gif(vessels, root / part / "1st_manual" / f"{i:02d}_manual1.gif", flavours[n % 3])
            _gif(disc, root / part / "mask" / f"{i:02d}_{part}_mask.gif", flavours[(n + 1) % 3])
            if part == "test":
                _gif(vessels, root / part / "2nd_manual" / f"{i:02d}_manual2.gif")
    return root


@pytest.mark.parametrize("flavour", ["L", "ramp", "inverted"])
def test_gif_masks_read_as_a_viewer_shows_them(tmp_path, flavour):
    _, vessels, _ = _disc_and_vessels(0)
    _gif(vessels, tmp_path / "m.gif", flavour)
    assert Image.open(tmp_path / "m.gif").mode == "P"
    reader = PILTiffReader()
    mask, _ = reader.get_data(reader.read(str(tmp_path / "m.gif")))
    np.testing.assert_array_equal(mask.T, vessels.astype(np.uint8) * 255)  # grey levels, (W, H) PIL axes


def test_colour_palette_masks_keep_their_label_indices(tmp_path):
    labels = np.zeros((4, 6), np.uint8)
    labels[:2], labels[2:3] = 1, 2
    image = Image.fromarray(labels, "P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])  # VOC-style colours: indices are the classes
    image.save(tmp_path / "m.png")
    mask, _ = PILTiffReader().get_data(PILTiffReader().read(str(tmp_path / "m.png")))
    np.testing.assert_array_equal(mask.T, labels)


def test_drive_layout_end_to_end(tmp_path):
    root, out = _drive(tmp_path / "DRIVE"), tmp_path / "out"
    with tifffile.TiffFile(root / "test/images/01_test.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW  # as released, needs imagecodecs
    assert main(["--root", str(root), "--output", str(out), "--val-fraction", "0.25"]) == 0
    datalist = read_json(out / "datalist.json")
    names = {k: [Path(e["image"]).name for e in datalist[k]] for k in ("training", "validation", "test")}
    assert names["test"] == ["01_test.tif", "02_test.tif"]
    assert sorted(names["training"] + names["validation"]) == [f"{i}_training.tif" for i in (21, 22, 23, 24)]
    assert len(names["validation"]) == 1
    assert datalist["test"][0] == {"image": "../DRIVE/test/images/01_test.tif",
                                   "label": "../DRIVE/test/1st_manual/01_manual1.gif",
                                   "fov": "../DRIVE/test/mask/01_test_mask.gif",
                                   "label_2nd": "../DRIVE/test/2nd_manual/01_manual2.gif"}
    summary = datalist["summary"]
    assert summary["layout"] == "DRIVE" and summary["fov"] == "shipped with the data set" and summary["official_split"]
    assert summary["fov_masks"] == 6 and summary["label_outside_fov"] == 0 and summary["empty_masks"] == []
    assert not (out / "fov").exists()  # shipped masks are used as they are
    # the training pipeline reads every GIF flavour as drawn
    load = Compose([LoadImaged("image", reader=PILTiffReader(mode="RGB"), ensure_channel_first=True),
                    LoadImaged(["label", "fov"], reader=PILTiffReader(), ensure_channel_first=True),
                    BinarizeMaskd(["label", "fov"])])
    for entry in load_datalist(out / "datalist.json", "training") + load_datalist(out / "datalist.json", "test"):
        _, vessels, disc = _disc_and_vessels(int(Path(entry["image"]).name[:2]) % 5)
        data = load(entry)
        assert data["image"].shape == (3, W, H)
        np.testing.assert_array_equal(data["label"][0].numpy().T, vessels)
        np.testing.assert_array_equal(data["fov"][0].numpy().T, disc)


def _error(caplog, *argv: str) -> str:
    """Run prepare_data in this process expecting it to fail; the error line it logs."""
    with caplog.at_level(logging.ERROR):
        assert main(list(argv)) == 2
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][-1]


def test_drive_errors_name_the_file(tmp_path, caplog):
    sizes = ("sizes are compared as a viewer shows the files (EXIF orientation applied): fix the pair or remove it "
             "from the data.")

    def case(name: str) -> tuple[Path, list[str]]:
        root = _drive(tmp_path / name)
        return root, ["--root", str(root), "--output", str(tmp_path / f"{name}-out")]

    root, args = case("label-size")
    label, image = root / "training/1st_manual/21_manual1.gif", root / "training/images/21_training.tif"
    _gif(np.zeros((H - 1, W), bool), label)
    assert _error(caplog, *args) == (f"error: mask {label} is {H - 1}×{W} (H×W) but its image {image} is {H}×{W}; "
                                     f"{sizes}")

    root, args = case("fov-size")
    fov, image = root / "test/mask/02_test_mask.gif", root / "test/images/02_test.tif"
    _gif(np.ones((H, W + 2), bool), fov)
    assert _error(caplog, *args) == (f"error: field-of-view mask {fov} is {H}×{W + 2} (H×W) but its image {image} is "
                                     f"{H}×{W}; {sizes}")

    root, args = case("fov-missing")
    (root / "test/mask/02_test_mask.gif").unlink()
    assert _error(caplog, *args) == (
        f"error: 1 image(s) in {root / 'test/images'} have no field-of-view mask in {root / 'test/mask'}: 02_test.tif "
        "has no 02_test_mask.*; add their field-of-view masks or move the images out.")

    root, args = case("fov-empty")
    fov = root / "training/mask/22_training_mask.gif"
    _gif(np.zeros((H, W), bool), fov)
    assert _error(caplog, *args) == (f"error: field-of-view mask {fov} has no pixel inside the field of view (it is "
                                     "all zero); replace it, or remove its image from the data.")

    root, args = case("unreadable")
    image = root / "training/images/23_training.tif"
    image.write_bytes(image.read_bytes()[:100])  # truncated
    assert _error(caplog, *args).startswith(f"error: cannot read image file {image}: it is ")
    assert not any((tmp_path / f"{n}-out" / "datalist.json").exists()
                   for n in ("label-size", "fov-size", "fov-missing", "fov-empty", "unreadable"))


def test_chase_layout_derives_fields_of_view_and_names_an_unreadable_image(tmp_path, caplog):
    root, out = tmp_path / "CHASE_DB1", tmp_path / "out"
    root.mkdir()
    for child in (1, 11):  # generated: the real set is tested above when present
        for eye in "LR":
            image, vessels, _ = _disc_and_vessels(child)
            stem = f"Image_{child:02d}{eye}"
            Image.fromarray(image).save(root / f"{stem}.jpg", quality=95)
            for observer in ("1st", "2nd"):
                Image.fromarray(vessels).save(root / f"{stem}_{observer}HO.png")  # 1-bit, as released
    assert main(["--root", str(root), "--output", str(out)]) == 0
    datalist = read_json(out / "datalist.json")
    assert [e["image"] for e in datalist["test"]] == ["../CHASE_DB1/Image_11L.jpg", "../CHASE_DB1/Image_11R.jpg"]
    assert [e["fov"] for e in datalist["training"]] == ["fov/Image_01L_fov.png", "fov/Image_01R_fov.png"]
    _, _, disc = _disc_and_vessels(0)
    fov = np.asarray(Image.open(out / "fov/Image_01L_fov.png")) > 0
    assert fov[disc].all() and not fov[~ndimage.binary_dilation(disc, iterations=2)].any()  # JPEG blurs the edge
    assert not list((out / "fov").glob(".*"))  # no temporary file left

    (root / "Image_11R.jpg").write_bytes(b"not a JPEG")
    assert _error(caplog, "--root", str(root), "--output", str(tmp_path / "out2")) == (
        f"error: cannot read image file {root / 'Image_11R.jpg'}: it is not an image file that Pillow or tifffile can "
        "read (is the file complete and its suffix right?); restore or replace the file, or remove it from the data.")


# ---- load_datalist: the field of view at training time ----------------------------------------------------------


def test_load_datalist_checks_the_field_of_view(tmp_path):
    root = _drive(tmp_path / "DRIVE", training=(21,), test=(1,))
    entry = {"image": "DRIVE/training/images/21_training.tif", "label": "DRIVE/training/1st_manual/21_manual1.gif",
             "fov": "DRIVE/training/mask/21_training_mask.gif"}
    path = tmp_path / "datalist.json"

    def message(fov) -> str:
        path.write_text(json.dumps({"training": [{**entry, "fov": fov}]}))
        with pytest.raises(InputError) as info:
            load_datalist(path, "training")
        return str(info.value)

    path.write_text(json.dumps({"training": [entry]}))
    assert load_datalist(path, "training")[0]["fov"] == str(root / "training/mask/21_training_mask.gif")
    assert message("DRIVE/training/mask/gone.gif").startswith(
        f"fov file {root / 'training/mask/gone.gif'} named in datalist {path} does not exist; its paths are relative "
        f"to {tmp_path}")
    _gif(np.ones((H + 1, W), bool), root / "training/mask/big.gif")
    assert message("DRIVE/training/mask/big.gif") == (
        f"field-of-view mask {root / 'training/mask/big.gif'} is {H + 1}×{W} (H×W) but its image "
        f"{root / 'training/images/21_training.tif'} is {H}×{W} (datalist {path}); sizes are compared as a viewer "
        "shows the files (EXIF orientation applied): fix the pair or remove it from the data.")
    shown = json.dumps({**entry, "fov": None})[:80]
    assert message(None) == (f"entry 0 of 'training' in datalist {path} has no 'fov' path ({shown}); 'fov', where "
                             "given, must name a file.")


# ---- split by subject -------------------------------------------------------------------------------------------


def test_split_by_group_keeps_subjects_together_and_defaults_to_the_old_draw():
    pairs = [{"image": Path(f"{i:03d}.jpg")} for i in range(40)]
    groups = [i // 2 for i in range(40)]  # two eyes per subject
    splits = split_pairs(pairs, seed=2, groups=groups)
    side = {}
    for name, part in splits.items():
        for p in part:
            assert side.setdefault(int(p["image"].stem) // 2, name) == name
    assert (len(splits["training"]), len(splits["validation"]), len(splits["test"])) == (28, 4, 8)
    # without groups: the draw of the thesis split as it was before groups existed
    rng = np.random.default_rng(5)
    order = rng.permutation(40)
    test, rest = [pairs[i] for i in sorted(order[:8])], [pairs[i] for i in sorted(order[8:])]
    order = rng.permutation(len(rest))
    expected = {"training": [rest[i] for i in sorted(order[3:])], "validation": [rest[i] for i in sorted(order[:3])],
                "test": test}
    assert split_pairs(pairs, seed=5) == expected


# ---- TIFF compressions: DRIVE's frames are LZW-compressed -------------------------------------------------------

LOSSLESS = ("lzw", "zlib", "packbits")  # zlib: Deflate (Adobe)


def _smooth_frame() -> np.ndarray:
    """An RGB frame of slow gradients, which JPEG compression keeps close."""
    yy, xx = np.mgrid[:H, :W]
    return np.stack([4 * xx + 40, 5 * yy + 20, np.full((H, W), 120)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("compression", [*LOSSLESS, "jpeg"])
def test_compressed_tiffs_load_through_the_reader_and_prepare_data(tmp_path, compression):
    frame, mask = _smooth_frame(), _disc_and_vessels(0)[1].astype(np.uint8) * 255
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images/a.tif", frame, compression=compression, photometric="rgb")
    tifffile.imwrite(tmp_path / "masks/a.tif", mask, compression="lzw" if compression == "jpeg" else compression)
    with tifffile.TiffFile(tmp_path / "images/a.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION[compression.upper().replace("ZLIB", "ADOBE_DEFLATE")]
    load = Compose([LoadImaged("image", reader=PILTiffReader(mode="RGB")), LoadImaged("label", reader=PILTiffReader())])
    data = load({"image": str(tmp_path / "images/a.tif"), "label": str(tmp_path / "masks/a.tif")})
    image = np.moveaxis(data["image"].numpy(), 0, 1)  # (W, H, C) -> (H, W, C)
    if compression == "jpeg":
        assert np.abs(image.astype(int) - frame).max() <= 8
    else:
        np.testing.assert_array_equal(image, frame)
    np.testing.assert_array_equal(data["label"].numpy().T, mask)
    out = tmp_path / "out"
    assert main(["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--output", str(out),
                 "--test-fraction", "0", "--val-fraction", "0"]) == 0
    assert read_json(out / "datalist.json")["training"] == [{"image": "../images/a.tif", "label": "../masks/a.tif"}]


@pytest.fixture
def without_imagecodecs(monkeypatch):
    """tifffile as it is without imagecodecs installed: its own fallback codecs (Deflate, no LZW, JPEG, PackBits)."""
    from tifffile import _imagecodecs

    monkeypatch.setattr(tifffile.tifffile, "imagecodecs", _imagecodecs)
    monkeypatch.setattr(tifffile.TIFF.DECOMPRESSORS, "_codecs", {})  # the codecs found so far


def test_a_missing_codec_says_what_to_install_and_a_damaged_tiff_what_to_replace(tmp_path, caplog,
                                                                                   without_imagecodecs):
    root = _drive(tmp_path / "DRIVE", training=(21,), test=(1,))
    image = root / "training/images/21_training.tif"
    reader = PILTiffReader(mode="RGB")
    with pytest.raises(InputError) as info:
        reader.get_data(reader.read(str(image)))
    assert isinstance(info.value.__cause__, ValueError)  # what tifffile raises: the codec, not the file
    assert str(info.value.__cause__) == "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package"
    missing = (f"error: cannot read image file {image}: its LZW compression needs the Python package imagecodecs, "
               "which is not installed; run `pip install imagecodecs` and try again.")
    assert _error(caplog, "--root", str(root), "--output", str(tmp_path / "out")) == missing
    # a damaged file is still the file's fault, with or without the codec
    damaged = ("it is not an image file that Pillow or tifffile can read (is the file complete and its suffix "
               "right?); restore or replace the file, or remove it from the data.")
    image.write_bytes(image.read_bytes()[:100])
    assert _error(caplog, "--root", str(root), "--output", str(tmp_path / "out")) == (
        f"error: cannot read image file {image}: {damaged}")


def test_a_truncated_lzw_tiff_is_named_as_damaged(tmp_path, caplog):
    root = _drive(tmp_path / "DRIVE", training=(21,), test=(1,))
    image = root / "test/images/01_test.tif"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # the strip cut in half
    assert _error(caplog, "--root", str(root), "--output", str(tmp_path / "out")) == (
        f"error: cannot read image file {image}: it is not an image file that Pillow or tifffile can read (is the "
        "file complete and its suffix right?); restore or replace the file, or remove it from the data.")


# ---- STARE and HRF: no official split, the bundle's documented one ----------------------------------------------

STARE_LABELLED = ("im0001", "im0002", "im0139", "im0162", "im0324")  # of the 20: 3 of the first 10, 2 of the last
SW, SH = 44, 36  # STARE's frames are 700×605, the disc clipped at top and bottom


def _stare_frame(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A STARE-like frame: the bright disc runs past the top and bottom edges; its vessel mask and its disc."""
    yy, xx = np.mgrid[:SH, :SW]
    disc = np.hypot(yy - SH / 2, xx - SW / 2) < 20
    vessels = disc & (np.abs(yy - xx + seed) < 2)
    image = np.zeros((SH, SW, 3), np.uint8)
    image[disc] = (200, 90, 40)
    image[vessels] = (110, 40, 20)
    return image, vessels, disc


def _ppm(array: np.ndarray, path: Path, gzipped: bool) -> None:
    """A PPM file, as STARE ships its images and labels (``.ppm.gz`` where ``gzipped``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array if array.ndim == 3 else np.repeat(array[..., None], 3, -1))
    if gzipped:
        buffer = io.BytesIO()
        image.save(buffer, format="PPM")
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(buffer.getvalue()))
    else:
        image.save(path)


def _stare(root: Path, gzipped: bool, images: str) -> Path:
    for n, stem in enumerate(STARE_LABELLED):
        image, vessels, _ = _stare_frame(n)
        _ppm(image, root / images / f"{stem}.ppm", gzipped)
        _ppm(vessels.astype(np.uint8) * 255, root / "labels-ah" / f"{stem}.ah.ppm", gzipped)
        _ppm(vessels.astype(np.uint8) * 255, root / "labels-vk" / f"{stem}.vk.ppm", gzipped=False)  # one plain folder
    return root


@pytest.mark.parametrize("gzipped, images", [(True, "stare-images"), (False, ".")])
def test_stare_layout_pairs_both_observers_and_derives_fields_of_view(tmp_path, gzipped, images):
    root, out = _stare(tmp_path / "STARE", gzipped, images), tmp_path / "out"
    released = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert main(["--root", str(root), "--output", str(out), "--val-fraction", "0.34"]) == 0
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == released  # the data folder is only read
    datalist = read_json(out / "datalist.json")
    names = {k: [Path(e["image"]).stem for e in datalist[k]] for k in ("training", "validation", "test")}
    assert names["test"] == ["im0162", "im0324"]
    assert sorted(names["training"] + names["validation"]) == ["im0001", "im0002", "im0139"]
    assert len(names["validation"]) == 1
    images_at, ah_at = ("unpacked/stare-images", "unpacked/labels-ah") if gzipped else ("../STARE",
                                                                                        "../STARE/labels-ah")
    assert datalist["test"][0] == {"image": f"{images_at}/im0162.ppm", "label": f"{ah_at}/im0162.ah.ppm",
                                   "label_2nd": "../STARE/labels-vk/im0162.vk.ppm", "fov": "fov/im0162_fov.png"}
    summary = datalist["summary"]
    assert summary["layout"] == "STARE" and summary["split"] == STARE_SPLIT and not summary["official_split"]
    assert summary["fov"].startswith("derived from the image") and summary["label_outside_fov"] == 0
    assert ("unpacked" in summary) == gzipped and (out / "unpacked").exists() == gzipped
    if gzipped:
        assert summary["unpacked"] == (f"10 gzip-compressed files of the data set decompressed into "
                                       f"{(out / 'unpacked').resolve()}, which the datalist names")
    # the training pipeline reads the PPMs; the derived field of view is the disc, clipped by the frame as it is
    load = Compose([LoadImaged("image", reader=PILTiffReader(mode="RGB"), ensure_channel_first=True),
                    LoadImaged(["label", "label_2nd", "fov"], reader=PILTiffReader(), ensure_channel_first=True),
                    BinarizeMaskd(["label", "label_2nd", "fov"])])
    for entry in load_datalist(out / "datalist.json", "test"):
        image, vessels, disc = _stare_frame(STARE_LABELLED.index(Path(entry["image"]).stem))
        data = load(entry)
        np.testing.assert_array_equal(np.moveaxis(data["image"].numpy(), 0, -1).transpose(1, 0, 2), image)
        for key, expected in (("label", vessels), ("label_2nd", vessels), ("fov", disc)):
            np.testing.assert_array_equal(data[key][0].numpy().T, expected)


def test_stare_names_a_damaged_gzip_file(tmp_path, caplog):
    root = _stare(tmp_path / "STARE", gzipped=True, images="stare-images")
    label = root / "labels-ah/im0139.ah.ppm.gz"
    label.write_bytes(label.read_bytes()[:-20])  # truncated download
    assert _error(caplog, "--root", str(root), "--output", str(tmp_path / "out")) == (
        f"error: cannot decompress {label}: it is not a complete gzip file (EOFError: Compressed file ended before "
        "the end-of-stream marker was reached); restore or replace the file, or remove it from the data.")
    assert not (tmp_path / "out/datalist.json").exists()


def test_hrf_layout_splits_each_category_alike(tmp_path):
    root, out = tmp_path / "HRF", tmp_path / "out"
    for category in ("dr", "g", "h"):
        for number in (1, 2, 6, 7):
            stem = f"{number:02d}_{category}"
            image, vessels, disc = _disc_and_vessels(number)
            (root / "images").mkdir(parents=True, exist_ok=True)
            suffix = ".jpg" if stem == "07_h" else ".JPG"  # the release has both
            Image.fromarray(image).save(root / "images" / f"{stem}{suffix}", quality=95)
            (root / "manual1").mkdir(exist_ok=True)
            tifffile.imwrite(root / "manual1" / f"{stem}.tif", vessels.astype(np.uint8) * 255)
            (root / "mask").mkdir(exist_ok=True)
            tifffile.imwrite(root / "mask" / f"{stem}_mask.tif", np.repeat(disc[..., None], 3, -1).astype(np.uint8)
                             * 255, photometric="rgb")  # HRF's masks are RGB
    assert main(["--root", str(root), "--output", str(out)]) == 0
    datalist = read_json(out / "datalist.json")
    names = {k: sorted(Path(e["image"]).stem for e in datalist[k]) for k in ("training", "validation", "test")}
    assert names["test"] == [f"{n:02d}_{c}" for n in (6, 7) for c in ("dr", "g", "h")]
    assert sorted(names["training"] + names["validation"]) == [f"{n:02d}_{c}" for n in (1, 2) for c in ("dr", "g", "h")]
    assert len(names["validation"]) == 1  # 10 % of 6
    assert datalist["test"][-1] == {"image": "../HRF/images/07_h.jpg", "label": "../HRF/manual1/07_h.tif",
                                    "fov": "../HRF/mask/07_h_mask.tif"}
    summary = datalist["summary"]
    assert summary["layout"] == "HRF" and summary["fov"] == "shipped with the data set"
    assert not summary["official_split"]
    assert summary["split"] == "the bundle's: images 01-05 of each category (dr, g, h) train, 06-15 test"
    assert summary["label_outside_fov"] == 0 and summary["fov_masks"] == 12 and not (out / "fov").exists()
