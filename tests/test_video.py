"""Video as inference input (configs/inference.yaml with video files and frame folders): frames in order with their
container times, frames.csv against the masks, the overlay video decoded back, the real CVC-ClinicDB clip, every bad
input with the line a user sees, the frame stream's workers, and the report's smoothing against a hand computation."""

from __future__ import annotations

import csv
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import CVC, bundle_error, last_line, needs, run, run_bundle
from ignite.engine import Engine
from monai.data import DataLoader, MetaTensor
from PIL import Image

from scripts.data import PILTiffReader
from scripts.video import FrameStream, VideoDecoder, VideoEncoder, VideoReport

INFER = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
TINY_NET = ["--image_size", "32", "--features", "[4,8,8,16,16]"]


def disc_frames(count: int, width: int = 96, height: int = 80, radius: int = 14) -> list[np.ndarray]:
    """A reddish disc moving right over a dark, textured background: (H, W, 3) uint8 frames."""
    rng = np.random.default_rng(0)
    background = (40 + rng.integers(0, 30, (height, width, 3))).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    frames = []
    for i in range(count):
        frame = background.copy()
        frame[(yy - height // 2) ** 2 + (xx - radius - 5 * i) ** 2 < radius ** 2] = (210, 90, 80)
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray], times: list[float] | None = None, rate: int = 25,
                codec: str = "libx264", options: dict | None = None, rotation: int = 0, audio: bool = False) -> Path:
    """Encode ``frames`` with PyAV, at ``rate`` or at the presentation ``times`` given (a variable frame rate)."""
    out = av.open(str(path), "w", options=options or {})
    stream = out.add_stream(codec, rate=rate)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "yuv420p" if codec == "libx264" else "bgr0"
    if codec == "libx264":
        stream.options = {"crf": "10"}
    time_base = Fraction(1, 1000)
    stream.codec_context.time_base = time_base
    if rotation:
        stream.set_display_rotation(rotation)
    sound = out.add_stream("aac", rate=8000) if audio else None
    for i, pixels in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = round((times[i] if times else i / rate) / time_base)
        frame.time_base = time_base
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    if sound is not None:
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        samples.sample_rate, samples.pts = 8000, 0
        for packet in [*sound.encode(samples), *sound.encode()]:
            out.mux(packet)
    out.close()
    return path


def decode(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """Every frame of a video and its time, as a player would show it (the bundle's decoder is tested on this)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return [f.to_ndarray(format="rgb24") for f in frames], [float(f.time) for f in frames]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def masks_of(folder: Path, names: list[str]) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / f"{name}_mask.png")) > 0 for name in names]


def check_rows_against_masks(rows: list[dict], masks: list[np.ndarray]) -> None:
    """frames.csv's presence, area and box, recomputed from the masks written beside it."""
    assert len(rows) == len(masks)
    for row, mask in zip(rows, masks):
        assert int(row["polyp"]) == int(mask.any()), row
        assert float(row["area_fraction"]) == pytest.approx(mask.mean(), abs=1e-6), row
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert [int(row[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")] == \
                [xs.min(), ys.min(), xs.max(), ys.max()], row
            assert float(row["max_probability"]) >= 0.5
        else:
            assert row["bbox_x0"] == "" and float(row["max_probability"]) < 0.5


def nearest(frame: np.ndarray, sources: list[np.ndarray]) -> int:
    """The index of the source frame closest to ``frame`` (mean absolute difference)."""
    return int(np.argmin([np.abs(frame.astype(float) - s.astype(float)).mean() for s in sources]))


VFR_TIMES = [0.0, 0.04, 0.12, 0.16, 0.28, 0.32, 0.5, 0.54]


@pytest.fixture(scope="module")
def video_run(balanced, tmp_path_factory):
    """
    One real inference command over a folder of every kind of input, good and bad, with two loader workers: the
    user's view (the last line) and the files. Returns (input folder, output folder, process, source frames).
    """
    root = tmp_path_factory.mktemp("video")
    inp = root / "in"
    inp.mkdir()
    discs = disc_frames(10)
    write_video(inp / "discs.mp4", discs)
    write_video(inp / "vfr.mkv", disc_frames(len(VFR_TIMES)), times=VFR_TIMES)
    write_video(inp / "talking.mp4", disc_frames(4), audio=True)
    tall = disc_frames(5, width=64, height=48)
    write_video(inp / "rotated.mp4", tall, rotation=90)
    write_video(inp / "odd.mkv", disc_frames(3, width=65, height=49), codec="ffv1")
    long = write_video(root / "long.mp4", disc_frames(40), options={"movflags": "+faststart"})
    data = long.read_bytes()
    (inp / "truncated.mp4").write_bytes(data[: 9 * len(data) // 10])  # an interrupted copy: header whole, frames cut
    data = write_video(root / "plain.mp4", disc_frames(6)).read_bytes()
    (inp / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: nothing can be read
    with av.open(str(inp / "sound.mp4"), "w") as out:  # audio only
        sound = out.add_stream("aac", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 4000), np.float32), format="fltp", layout="mono")
        samples.sample_rate, samples.pts = 8000, 0
        for packet in [*sound.encode(samples), *sound.encode()]:
            out.mux(packet)
    with av.open(str(inp / "empty.mp4"), "w") as out:  # a zero-frame video
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()
    (inp / "clip").mkdir()
    for i, pixels in enumerate(disc_frames(12), start=1):  # 1.png ... 12.png: natural order, not 1, 10, 11, 12, 2
        Image.fromarray(pixels).save(inp / "clip" / f"{i}.png")
    (inp / "mixed").mkdir()
    Image.fromarray(discs[0]).save(inp / "mixed" / "1.png")
    Image.fromarray(tall[0]).save(inp / "mixed" / "2.png")
    Image.fromarray(discs[3]).save(inp / "still.png")
    out = root / "out"
    proc = run(*INFER, "--input_dir", str(inp), "--output_dir", str(out), "--ckpt_dir", str(balanced / "models"),
               *TINY_NET, "--num_workers", "2", check=False)
    return inp, out, proc, {"discs": discs, "clip": disc_frames(12), "tall": tall}


def test_a_video_is_inferred_frame_by_frame_in_order(video_run):
    _, out, proc, sources = video_run
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    names = [f"{i:06d}" for i in range(10)]
    masks = masks_of(out / "discs", names)
    assert all(m.shape == (80, 96) for m in masks)
    assert 0 < np.mean([m.mean() for m in masks]) < 1, "constant masks could not show a wrong box or area"
    rows = read_rows(out / "discs" / "frames.csv")
    assert [int(r["frame"]) for r in rows] == list(range(10))
    assert [float(r["time_s"]) for r in rows] == pytest.approx([i / 25 for i in range(10)], abs=1e-6)
    check_rows_against_masks(rows, masks)
    overlay, times = decode(out / "discs" / "overlay.mp4")
    assert len(overlay) == 10 and overlay[0].shape == (80, 96, 3)
    assert times == pytest.approx([i / 25 for i in range(10)], abs=1e-3)
    assert [nearest(f, sources["discs"]) for f in overlay] == list(range(10)), "the overlay's frames out of order"
    with av.open(str(out / "discs" / "overlay.mp4")) as container:  # what common players open
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.video[0].average_rate == 25


def test_variable_frame_rate_times_come_from_the_container(video_run):
    _, out, _, _ = video_run
    rows = read_rows(out / "vfr" / "frames.csv")
    assert [float(r["time_s"]) for r in rows] == pytest.approx(VFR_TIMES, abs=1e-6)
    _, times = decode(out / "vfr" / "overlay.mp4")
    assert times == pytest.approx(VFR_TIMES, abs=1e-3)  # not index / fps


def test_audio_rotation_and_odd_sizes(video_run):
    _, out, _, sources = video_run
    assert len(read_rows(out / "talking" / "frames.csv")) == 4  # the audio track is ignored
    # stored 64x48 with a display rotation of 90° counter-clockwise: upright 48 wide, 64 high, as a player shows it
    masks = masks_of(out / "rotated", [f"{i:06d}" for i in range(5)])
    assert all(m.shape == (64, 48) for m in masks)
    overlay, _ = decode(out / "rotated" / "overlay.mp4")
    upright = [np.rot90(f) for f in sources["tall"]]
    assert overlay[0].shape == (64, 48, 3)
    assert [nearest(f, upright) for f in overlay] == list(range(5))
    # 65x49: the masks keep the size, the overlay (H.264 4:2:0 needs even sides) gains one edge pixel each way
    assert masks_of(out / "odd", ["000000"])[0].shape == (49, 65)
    overlay, _ = decode(out / "odd" / "overlay.mp4")
    assert len(overlay) == 3 and overlay[0].shape == (50, 66, 3)


def test_a_frame_folder_is_a_clip_in_natural_order(video_run):
    inp, out, _, sources = video_run
    rows = read_rows(out / "clip" / "frames.csv")
    assert [float(r["time_s"]) for r in rows] == pytest.approx([i / 25 for i in range(12)])  # --frame_rate 25
    check_rows_against_masks(rows, masks_of(out / "clip", [str(i) for i in range(1, 13)]))
    overlay, _ = decode(out / "clip" / "overlay.mp4")
    assert [nearest(f, sources["clip"]) for f in overlay] == list(range(12)), "2.png must come before 10.png"
    assert (out / "still_mask.png").is_file() and not (out / "clip" / "uncertainty.csv").exists()


def test_bad_videos_are_named_and_the_others_written(video_run):
    _, out, proc, _ = video_run
    assert proc.returncode == 1, "a run that skipped inputs must not exit 0"
    last = last_line(proc)
    assert last.startswith("error: inference wrote 8 of 12 inputs to "), last
    for expected in ("; 4 could not be read: cut.mp4 (cannot read video ", "(truncated, corrupt or not a video file)",
                     "sound.mp4 (video file ", "holds no video stream (it holds audio only)",
                     "empty.mp4 (video file ", "empty.mp4 holds no video stream)",
                     "mixed (its frames differ in size: 2.png is 64x48, 1.png 96x80",
                     "; 1 decoded in part: truncated.mp4 (", " of the 40 frames its header declares decoded)",
                     "fix or remove them and run again."):
        assert expected in last, f"{expected!r} not in {last!r}"
    rows = read_rows(out / "truncated" / "frames.csv")  # what could be decoded is written
    assert 0 < len(rows) < 40 and f"{len(rows)} of the 40 frames" in last
    assert "Traceback" not in proc.stderr


def test_mc_dropout_on_a_video_goes_to_frames_csv_and_the_overlay(balanced, tmp_path):
    frames = disc_frames(4)
    video = write_video(tmp_path / "discs.mp4", frames)
    out = tmp_path / "out"
    run_bundle("run", "--config_file", "configs/inference.yaml", "--input", str(video), "--output_dir", str(out),
               "--ckpt_dir", str(balanced / "models"), *TINY_NET, "--num_workers", "0", "--mc_samples", "3",
               "--smoothing", "0.5")
    rows = read_rows(out / "discs" / "frames.csv")
    assert len(rows) == 4 and all(r["mean_mi"] == "" or float(r["mean_mi"]) >= 0 for r in rows)
    assert any(r["mean_mi"] for r in rows)
    assert {"polyp_smoothed", "area_fraction_smoothed"} <= set(rows[0])
    smoothed = masks_of(out / "discs" / "smoothed", [f"{i:06d}" for i in range(4)])
    assert [float(r["area_fraction_smoothed"]) for r in rows] == pytest.approx([m.mean() for m in smoothed], abs=1e-6)
    assert not list(out.rglob("*_mutual_information.png")), "a video's frames get no per-frame map files"
    overlay, _ = decode(out / "discs" / "overlay.mp4")
    assert len(overlay) == 4


def _report_run(tmp_path, probabilities: list[np.ndarray], smoothing: float) -> Path:
    """VideoReport on a real Ignite engine whose steps return the given (H, W) probability maps of one video."""
    frames = [np.full((*p.shape, 3), 100, np.uint8) for p in probabilities]
    video = write_video(tmp_path / "clip.mp4", frames)
    report = VideoReport(tmp_path / "out", PILTiffReader(mode="RGB"), smoothing=smoothing)

    def step(engine, index):
        meta = {"filename_or_obj": str(tmp_path / "clip" / f"{index:06d}")}
        probability = torch.from_numpy(probabilities[index].T.copy())[None]  # (1, W, H), PIL order
        engine.state.batch = [{"source": str(video), "kind": "video", "frame": index, "time": index / 25,
                               "last": index == len(probabilities) - 1, "problem": "", "decode_seconds": 0.0}]
        return [{"pred": MetaTensor((probability >= 0.5).float(), meta=meta),
                 "pred_probability": MetaTensor(probability, meta=meta)}]

    engine = Engine(step)
    report.attach(engine)
    engine.run(list(range(len(probabilities))), max_epochs=1)
    return tmp_path / "out" / "clip"


def test_the_report_smooths_probabilities_exponentially_and_keeps_the_raw(tmp_path):
    rng = np.random.default_rng(1)
    probabilities = [rng.random((20, 30)) for _ in range(5)]
    folder = _report_run(tmp_path, probabilities, smoothing=0.6)
    rows = read_rows(folder / "frames.csv")
    expected = probabilities[0].astype(np.float64)
    for i, (row, p) in enumerate(zip(rows, probabilities)):
        expected = expected if i == 0 else 0.4 * p + 0.6 * expected  # s_t = (1 - w) p_t + w s_{t-1}
        smoothed = np.asarray(Image.open(folder / "smoothed" / f"{i:06d}_mask.png")) > 0
        np.testing.assert_array_equal(smoothed, expected >= 0.5)
        assert float(row["area_fraction_smoothed"]) == pytest.approx((expected >= 0.5).mean(), abs=1e-6)
        assert float(row["area_fraction"]) == pytest.approx((p >= 0.5).mean(), abs=1e-6)  # the raw kept
        assert float(row["max_probability"]) == pytest.approx(p.max(), abs=1e-6)


def test_the_overlay_outlines_the_mask_and_tints_uncertainty():
    pixels = np.full((40, 50, 3), 100, np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[10:30, 15:35] = True
    plain = VideoReport.overlay(pixels, mask)
    outline = (plain == (0, 255, 0)).all(axis=-1)
    assert outline[10, 20] and outline[20, 15] and not outline[20, 25] and not outline[5, 5]  # edge, not inside
    assert (plain[~outline] == 100).all()
    mi = np.zeros((40, 50))
    mi[0:5, 0:5] = math.log(2)
    tinted = VideoReport.overlay(pixels, mask, mi)
    assert (tinted[0:5, 0:5] != 100).any() and (tinted[35:, 40:] == 100).all()


def test_the_frame_stream_shares_inputs_between_workers_and_keeps_each_in_order(tmp_path):
    inputs = [{"kind": "video", "source": str(write_video(tmp_path / f"v{k}.mp4", disc_frames(n)))}
              for k, n in enumerate((7, 5, 3))]
    inputs.append({"kind": "image", "image": "still.png"})
    loader = DataLoader(FrameStream(inputs), batch_size=1, num_workers=2, collate_fn=lambda batch: batch[0])
    seen: dict[str, list[int]] = {}
    for item in loader:
        seen.setdefault(Path(item["source"]).name, []).append(item["frame"])
        assert item["last"] == (item["kind"] == "image" or item["frame"] == {"v0.mp4": 6, "v1.mp4": 4,
                                                                             "v2.mp4": 2}[Path(item["source"]).name])
    assert seen == {"v0.mp4": list(range(7)), "v1.mp4": list(range(5)), "v2.mp4": list(range(3)), "still.png": [0]}


def test_the_encoder_keeps_times_and_writes_whole_files_only(tmp_path):
    frames = disc_frames(5, width=33, height=21)
    encoder = VideoEncoder(tmp_path / "o.mp4", 33, 21, rate=Fraction(30000, 1001))
    for pixels, seconds in zip(frames, [0.0, 0.1, 0.15, 0.5, 0.51]):
        encoder.write(pixels, seconds)
    assert not (tmp_path / "o.mp4").exists(), "the final name appears only once the file is whole"
    encoder.close()
    decoded, times = decode(tmp_path / "o.mp4")
    assert times == pytest.approx([0.0, 0.1, 0.15, 0.5, 0.51], abs=1e-3) and decoded[0].shape == (22, 34, 3)
    aborted = VideoEncoder(tmp_path / "a.mp4", 33, 21)
    aborted.write(frames[0], 0.0)
    aborted.abort()
    assert not list(tmp_path.glob("*a.mp4*"))


def test_the_decoder_counts_what_a_damaged_video_loses(tmp_path):
    data = write_video(tmp_path / "v.mp4", disc_frames(30), options={"movflags": "+faststart"}).read_bytes()
    (tmp_path / "t.mp4").write_bytes(data[: 2 * len(data) // 3])
    decoder = VideoDecoder(tmp_path / "t.mp4")
    frames = list(decoder)
    assert [f.index for f in frames] == list(range(len(frames))) and 0 < len(frames) < 30
    assert decoder.problem.endswith(f"{len(frames)} of the 30 frames its header declares decoded")
    assert VideoDecoder(tmp_path / "v.mp4").problem is None


@pytest.mark.parametrize("overrides, expected", [
    ({"smoothing": 1.5}, "error: --smoothing must be a number in [0, 1)"),
    ({"frame_rate": 0}, "error: --frame_rate must be a positive number of frames per second, got 0."),
    ({"frame_rate": "fast"}, "error: --frame_rate must be a positive number of frames per second, got 'fast'."),
    ({"input": "/nonexistent/clip.mp4"}, "error: input /nonexistent/clip.mp4 does not exist."),
])
def test_bad_settings_end_in_one_line(balanced, tmp_path, overrides, expected):
    write_video(tmp_path / "v.mp4", disc_frames(2))
    message = bundle_error(["configs/inference.yaml"], input_dir=str(tmp_path), output_dir=str(tmp_path / "o"),
                           ckpt_dir=str(balanced / "models"), image_size=32, features=[4, 8, 8, 16, 16],
                           num_workers=0, **overrides)
    assert message.startswith(expected), message


def test_two_inputs_of_one_name_stop_before_any_work(balanced, tmp_path):
    write_video(tmp_path / "clip.mp4", disc_frames(2))
    (tmp_path / "clip").mkdir()
    Image.fromarray(disc_frames(1)[0]).save(tmp_path / "clip" / "1.png")
    message = bundle_error(["configs/inference.yaml"], input_dir=str(tmp_path), output_dir=str(tmp_path / "o"),
                           ckpt_dir=str(balanced / "models"), image_size=32, features=[4, 8, 8, 16, 16])
    assert message == (f"error: {tmp_path / 'clip'} and {tmp_path / 'clip.mp4'} would both write their outputs to "
                       "<output_dir>/clip/; rename one of them.")
    assert not (tmp_path / "o").exists()


@needs(CVC)
def test_the_real_cvc_clinicdb_clip_as_video_and_as_frames(balanced, tmp_path):
    """Frames 1-8 of CVC-ClinicDB's first sequence, consecutive: as an H.264 clip and as the released TIFF folder."""
    reader = PILTiffReader(mode="RGB")
    tiffs = sorted((CVC / "images").glob("*.tif"), key=lambda p: int(p.stem))
    assert [p.stem for p in tiffs] == [str(i) for i in range(1, 9)]
    frames = [np.asarray(reader.get_data(reader.read(str(p)))[0]).transpose(1, 0, 2) for p in tiffs]
    inp = tmp_path / "in"
    (inp / "cvc").mkdir(parents=True)
    write_video(inp / "clip1.mp4", frames)
    for p in tiffs:
        (inp / "cvc" / p.name).symlink_to(p)
    out = tmp_path / "out"
    run_bundle("run", "--config_file", "configs/inference.yaml", "--input_dir", str(inp), "--output_dir", str(out),
               "--ckpt_dir", str(balanced / "models"), *TINY_NET, "--num_workers", "0")
    video_masks = masks_of(out / "clip1", [f"{i:06d}" for i in range(8)])
    folder_masks = masks_of(out / "cvc", [str(i) for i in range(1, 9)])
    assert all(m.shape == (288, 384) for m in video_masks + folder_masks)
    check_rows_against_masks(read_rows(out / "clip1" / "frames.csv"), video_masks)
    check_rows_against_masks(read_rows(out / "cvc" / "frames.csv"), folder_masks)
    for a, b in zip(video_masks, folder_masks):  # the same frames, but for H.264's losses
        assert (a == b).mean() > 0.97
    for name in ("clip1", "cvc"):
        overlay, _ = decode(out / name / "overlay.mp4")
        assert len(overlay) == 8 and overlay[0].shape == (288, 384, 3)
        assert [nearest(f, frames) for f in overlay] == list(range(8))


def test_the_frame_list_leaves_out_the_output_folder_and_sorts_naturally(tmp_path):
    from scripts.data import FrameList

    write_video(tmp_path / "v10.mp4", disc_frames(2))
    write_video(tmp_path / "v2.mp4", disc_frames(2))
    for folder in ("clip", "out"):  # out: an earlier run's masks, inside input_dir
        (tmp_path / folder).mkdir()
        for i in (10, 2, 1):
            Image.fromarray(disc_frames(1)[0]).save(tmp_path / folder / f"{i}.png")
    inputs = FrameList(tmp_path, output_dir=tmp_path / "out").scan()
    assert [(e["kind"], Path(e["source"]).name) for e in inputs] == [("frames", "clip"), ("video", "v2.mp4"),
                                                                      ("video", "v10.mp4")]
    assert [Path(p).name for p in inputs[0]["frames"]] == ["1.png", "2.png", "10.png"]
