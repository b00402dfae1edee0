"""Retinal vessel sets as released: CHASE_DB1 (real, when present) and DRIVE (generated in its layout), with FOVs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import CHASE, needs, read_json
from monai.transforms import Compose, LoadImaged
from PIL import Image
from scipy import ndimage
from scripts.data import BinarizeMaskd, PILTiffReader, find_pairs, load_datalist, split_pairs
from scripts.errors import InputError
from scripts.prepare_data import find_layout, main, split_layout

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
    """DRIVE's official layout, small: TIFF frames, GIF vessel masks (1st and, for test/, 2nd observer) and FOVs."""
    flavours = ("L", "ramp", "inverted")
    for part, ids in (("training", training), ("test", test)):
        for n, i in enumerate(ids):
            image, vessels, disc = _disc_and_vessels(i % 5)
            (root / part / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / part / "images" / f"{i:02d}_{part}.tif")
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
    assert summary["layout"] == "DRIVE" and summary["fov"] == "shipped with the data set"
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
