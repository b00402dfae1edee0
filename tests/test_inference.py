"""Inference (configs/inference.yaml) as a user runs it: unreadable frames, bad folders, masks against a hand
reference, a non-square network input, the uncertainty report's files, and the large-frame benchmark at toy size."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BUNDLE_ROOT, bundle_error, last_line, run, run_bundle, trained_network
from monai.data import MetaTensor
from PIL import Image

INFER = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
TINY_NET = ["--features", "[4,8,8,16,16]", "--num_workers", "0"]


def _good_frames(folder: Path, demo: Path) -> list[Path]:
    """Three readable frames: the demo's 384×288, an odd-sized non-square crop (227 wide, 301 high) and a square."""
    folder.mkdir()
    wide = Image.open(demo / "images" / "demo_001.jpg").convert("RGB")
    assert wide.size == (384, 288)
    wide.save(folder / "wide.jpg")
    wide.transpose(Image.Transpose.ROTATE_90).crop((30, 40, 257, 341)).save(folder / "tall.png")
    wide.crop((0, 0, 256, 256)).save(folder / "square.bmp")
    return sorted(folder.iterdir())


def _reference_mask(net: torch.nn.Module, frame: Path, image_size) -> np.ndarray:
    """
    The mask by hand, as PNG (H, W) 0/255: the frame in PIL axis order (C, W, H) as float32, ``area`` down to the
    network size, /255, the network, the foreground softmax, bilinear (align_corners=False) back, >= 0.5.
    """
    rgb = np.asarray(Image.open(frame).convert("RGB"))  # (H, W, 3)
    x = torch.from_numpy(rgb.copy()).permute(2, 1, 0)[None].float()  # (1, 3, W, H)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = F.interpolate(x, size=(width, height), mode="area") / 255.0
    with torch.no_grad():
        foreground = torch.softmax(net(x).float(), dim=1)[:, 1:]
    foreground = F.interpolate(foreground, size=rgb.shape[1::-1], mode="bilinear", align_corners=False)
    return ((foreground[0, 0] >= 0.5).numpy().T * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def mixed_run(demo, balanced, tmp_path_factory):
    """Plain inference on three good frames and one truncated JPEG, run once for the tests below."""
    root = tmp_path_factory.mktemp("mixed")
    frames = _good_frames(root / "in", demo)
    jpeg = (root / "in" / "wide.jpg").read_bytes()
    (root / "in" / "bad.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # cut short, as by an interrupted copy
    out = root / "out"
    proc = run(*INFER, "--input_dir", str(root / "in"), "--output_dir", str(out), "--ckpt_dir",
               str(balanced / "models"), "--image_size", "32", *TINY_NET, check=False)
    return frames, out, proc


def test_an_unreadable_frame_is_skipped_named_and_fails_the_run(mixed_run):
    frames, out, proc = mixed_run
    assert proc.returncode != 0, "a run that skipped a frame must not exit 0"
    last = last_line(proc)
    assert last.startswith("error: inference wrote 3 of 4 frames"), proc.stderr[-3000:]
    assert "bad.jpg (truncated or corrupt JPEG)" in last and "Traceback" not in proc.stderr
    assert "skipping frame" in proc.stdout and "bad.jpg" in proc.stdout  # the warning, when it was found
    assert sorted(p.name for p in out.glob("*_mask.png")) == sorted(f"{f.stem}_mask.png" for f in frames)
    assert not (out / "bad_mask.png").exists()


def _check_masks(out: Path, frames: list[Path], net: torch.nn.Module, image_size) -> None:
    for frame in frames:
        written = np.asarray(Image.open(out / f"{frame.stem}_mask.png"))
        expected = _reference_mask(net, frame, image_size)
        assert written.shape == expected.shape == np.asarray(Image.open(frame)).shape[:2], frame.name
        assert 0.05 < (expected > 0).mean() < 0.95, f"{frame.name}: a mask of one class makes the comparison empty"
        np.testing.assert_array_equal(written, expected, err_msg=frame.name)  # pixel for pixel


def test_masks_equal_the_hand_reference(mixed_run, balanced):
    frames, out, _ = mixed_run
    _check_masks(out, frames, trained_network(balanced), 32)


def test_a_non_square_network_input(demo, balanced, tmp_path):
    frames = _good_frames(tmp_path / "in", demo)
    out = tmp_path / "out"
    run_bundle(*INFER[2:], "--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--ckpt_dir",
               str(balanced / "models"), "--image_size", "[32,48]", *TINY_NET)
    _check_masks(out, frames, trained_network(balanced), [32, 48])


@pytest.mark.parametrize("case", ["missing input", "no images", "output is a file"])
def test_a_bad_folder_ends_in_one_sentence_before_any_work(case, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    if case != "missing input":
        inputs.mkdir()
        (inputs / "notes.txt").write_text("not a frame")
    if case == "output is a file":
        Image.new("RGB", (40, 30)).save(inputs / "frame.jpg")
        out.write_text("")
    # no model here: the error must come before the checkpoint is loaded (or any frame read)
    expected = {"missing input": f"error: input_dir {inputs} does not exist: pass --input_dir",
                "no images": f"error: input_dir {inputs} holds no image file",
                "output is a file": f"error: --output_dir {out} is an existing file: pass --output_dir a folder"}[case]
    if case == "missing input":  # as a user's command: the last line on the terminal, no traceback
        proc = run(*INFER, "--input_dir", str(inputs), "--output_dir", str(out), "--ckpt_dir",
                   str(tmp_path / "no_models"), "--image_size", "32", *TINY_NET, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        last = last_line(proc)
    else:  # in this process (test_messages ties the bundle's lines to the terminal)
        last = bundle_error(["configs/inference.yaml"], input_dir=str(inputs), output_dir=str(out),
                            ckpt_dir=str(tmp_path / "no_models"), image_size=32, features=[4, 8, 8, 16, 16],
                            num_workers=0)
    assert last.startswith(expected), last
    assert out.is_file() if case == "output is a file" else not out.exists()


def test_frame_list_skips_and_names_every_unreadable_file(tmp_path, caplog):
    from scripts.errors import InputError
    from scripts.data import FrameList

    Image.new("RGB", (40, 30), (200, 90, 80)).save(tmp_path / "good.jpg")
    jpeg = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "text.png").write_bytes(b"not a png at all")
    (tmp_path / "empty.bmp").write_bytes(b"")
    (tmp_path / "readme.txt").write_text("ignored: not an image suffix")
    frames = FrameList(tmp_path)
    assert frames.scan() == [{"kind": "image", "image": str(tmp_path / "good.jpg")}]
    assert frames.scan() == [{"kind": "image", "image": str(tmp_path / "good.jpg")}]  # scanned once
    assert {p.name: why for p, why in frames.unreadable} == {
        "cut.jpg": "truncated or corrupt JPEG", "text.png": "not a PNG image", "empty.bmp": "empty file"}
    assert sum("skipping frame" in r.getMessage() for r in caplog.records) == 3
    with pytest.raises(InputError, match=r"^inference wrote 1 of 4 frames to OUT; 3 could not be read: "
                                         r"cut.jpg \(truncated or corrupt JPEG\), empty.bmp \(empty file\), text.png"):
        frames.check_all_written("OUT")

    (tmp_path / "good.jpg").unlink()
    with pytest.raises(InputError, match="none of the 3 image files"):
        FrameList(tmp_path).scan()


def test_resize_to_original_is_bilinear_and_leaves_the_frame_space():
    from monai.transforms import Resized

    from scripts.transforms import ResizeToOriginald

    image = MetaTensor(torch.rand(3, 53, 41), meta={"spatial_shape": np.array([53, 41])})
    small = Resized("image", (16, 12), mode="area")({"image": image})["image"]
    pred = MetaTensor(torch.rand(2, 16, 12), meta=dict(small.meta), applied_operations=list(small.applied_operations))
    out = ResizeToOriginald("pred", ref_key="image")({"image": small, "pred": pred})["pred"]
    expected = F.interpolate(pred.as_tensor()[None], size=(53, 41), mode="bilinear", align_corners=False)[0]
    assert out.shape == (2, 53, 41) and out.dtype == torch.float32
    torch.testing.assert_close(out.as_tensor(), expected, rtol=0, atol=0)
    assert out.applied_operations == []
    torch.testing.assert_close(out.affine, image.affine.to(out.affine.dtype))  # the frame's own space again


def test_uncertainty_report_writes_whole_files_or_none(tmp_path, monkeypatch):
    import nibabel as nib
    from ignite.engine import Engine

    from scripts.figures import colour_map
    from scripts.reports import UncertaintyReport

    def item(name: str, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        maps = {k: MetaTensor(torch.rand(1, 23, 17, generator=g) * 0.2, meta={"filename_or_obj": name})
                for k in ("probability", "variance", "entropy", "mutual_information")}
        mask = MetaTensor((maps["probability"][0] > 0.1).float(), meta={"filename_or_obj": name})
        return {"pred": mask, **{f"pred_{k}": v for k, v in maps.items()}}

    report = UncertaintyReport(tmp_path)
    engine = Engine(lambda e, b: None)
    report._start(engine)
    assert (tmp_path / "uncertainty.csv").read_text().splitlines() == [",".join(UncertaintyReport.COLUMNS)]
    engine.state.output = [item("/frames/a.jpg", 0)]
    report(engine)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    variance = engine.state.output[0]["pred_variance"][0].numpy()  # (W, H) = (23, 17), PIL order
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "a_variance.nii.gz").dataobj), variance)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a_variance.png")),  # (H, W, 3)
                                  colour_map(variance, "variance").transpose(1, 0, 2))

    # a crash while a map is written leaves no part of a file and every earlier file as it was
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", crash)
    engine.state.output = [item("/frames/a.jpg", 1)]
    with pytest.raises(OSError, match="disk full"):
        report(engine)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first  # no temporary file left either
    monkeypatch.undo()

    engine.state.output = [item("/frames/b.jpg", 2)]
    report(engine)
    rows = list(csv.DictReader((tmp_path / "uncertainty.csv").read_text().splitlines()))
    assert [r["image"] for r in rows] == ["/frames/a.jpg", "/frames/b.jpg"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_large_frame_benchmark_runs_at_toy_size(trained, tmp_path):
    proc = run(str(BUNDLE_ROOT / "benchmarks" / "large_frame.py"), "--sizes", "40x30", "64x48", "--mc-samples", "0",
               "--ckpt-dir", str(trained / "models"), "--image-size", "32", "--features", "4", "8", "8", "16", "16",
               "--work-dir", str(tmp_path))
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["plain"]]
    assert [r[1] for r in rows] == ["40x30", "64x48"], proc.stdout
    assert rows[0][6] == "(baseline)" and rows[1][5] == "-"  # no GPU memory on a CPU
    seconds, peak_mb = float(rows[1][3]), float(rows[1][4])
    assert 0 < seconds < 300 and 100 < peak_mb < 10_000
    assert float(rows[1][-1]) == pytest.approx(64 * 48 / (40 * 30), abs=0.05)  # the pixel ratio
    assert sorted(p.name for p in (tmp_path / "out_64x48_mc0_0").iterdir()) == ["frame_mask.png"]
