# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Colonoscopy video: decoding video files as a stream, the stream of frames inference reads (still images, frame
folders and video files alike), the overlay video, and the per-video report of an inference run.

PyAV decodes and encodes: its wheel ships FFmpeg with libx264, so nothing is downloaded at run time, and it gives
each frame's presentation time from the container (``frame.time``), right for variable frame rates too. MONAI's
``VideoFileDataset`` is OpenCV-only, seeks frame by frame and returned frame 0 for every index with
``multiprocessing=True`` (MONAI 1.6.1); OpenCV's wheel cannot encode H.264.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import apply_transform
from PIL import Image
from scipy import ndimage

from scripts.errors import InputError, is_number
from scripts.files import atomic_path

__all__ = ["VIDEO_SUFFIXES", "output_name", "VideoFrame", "VideoDecoder", "VideoEncoder", "FrameStream", "VideoReport"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")
FRAME_NAME = "{index:06d}"  # a video frame's name in the outputs: <video stem>/000017_mask.png
logger = logging.getLogger(__name__)


def output_name(source: str | os.PathLike, kind: str) -> str:
    """The folder in ``output_dir`` of a video's or frame folder's outputs: the video's stem, the folder's name."""
    return Path(source).stem if kind == "video" else Path(source).name


@dataclass(frozen=True)
class VideoFrame:
    """
    One frame decoded from a video, turned upright as a player shows it, in the form ``LoadImaged`` passes to the
    bundle's reader (``scripts.data.PILTiffReader`` reads it as it reads a file). ``str()`` is the name the frame's
    outputs take, ``<video folder>/<video stem>/<index>``, so that ``SaveImaged`` writes them into a folder per
    video.

    Attributes:
        array: (H, W, 3) uint8 RGB.
        name: ``<video folder>/<video stem>/000017``.
        index: the frame's position in decoding order, from 0.
        time: presentation time in seconds, from the container's timestamps.
    """

    array: np.ndarray
    name: str
    index: int
    time: float

    def to_image(self) -> Image.Image:
        return Image.fromarray(self.array)

    def __str__(self) -> str:
        return self.name


def _reason(error: Exception) -> str:
    text = str(error).split(":")[0] if isinstance(error, av.error.FFmpegError) else str(error)
    return getattr(error, "strerror", None) or text


class VideoDecoder:
    """
    The frames of one video file decoded in order as a stream: one frame in memory at a time whatever the video's
    length. Only the first video stream is read (audio and subtitle tracks are ignored); each frame is turned as
    its display matrix says (``frame.rotation``, counter-clockwise), so masks line up with what a player shows.

    A packet that cannot be decoded is skipped and counted (``bad_packets``): a damaged stretch costs its frames,
    not the video. :attr:`problem` then says what was lost. A file that cannot be opened, holds no video stream or
    no frame raises an :class:`InputError` naming it (:meth:`probe` checks this before any work).

    Args:
        path: the video file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.bad_packets = 0
        self.decoded = 0
        self.declared = 0  # frames the container's header declares; 0 when it does not say (Matroska, WebM)
        self.rate: Fraction | None = None
        self.time_base: Fraction | None = None

    def _open(self):
        if not self.path.is_file():
            raise InputError(f"video {self.path} does not exist.")
        try:
            container = av.open(str(self.path), metadata_errors="ignore")
        except av.error.FFmpegError as e:
            raise InputError(f"cannot read video {self.path}: {_reason(e).lower()} (truncated, corrupt or not a "
                             "video file).") from e
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            container.close()
            held = f" (it holds {' and '.join(kinds)} only)" if kinds else ""
            raise InputError(f"video file {self.path} holds no video stream{held}.")
        stream = container.streams.video[0]  # slice threads (PyAV's default): frame threads lose the frames they
        # hold when a damaged packet's error surfaces, and decoding in a loader worker keeps up with inference anyway
        self.declared = int(stream.frames or 0)
        self.rate = stream.average_rate or stream.guessed_rate or None
        self.time_base = stream.time_base
        return container, stream

    def probe(self) -> VideoFrame:
        """Open the file and decode up to its first frame: an :class:`InputError` naming it when that fails."""
        for frame in self:
            return frame
        raise InputError(f"video {self.path} holds no frame that can be decoded"
                         f"{f' ({self.problem})' if self.bad_packets else ''}.")

    def __iter__(self) -> Iterator[VideoFrame]:
        self.bad_packets = self.decoded = 0
        container, stream = self._open()
        folder = self.path.parent / output_name(self.path, "video")
        try:
            packets = container.demux(stream)
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except av.error.FFmpegError:  # the demuxer lost the file: the rest is unreachable
                    self.bad_packets += 1
                    break
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    self.bad_packets += 1
                    continue
                for frame in frames:
                    array = frame.to_ndarray(format="rgb24")
                    if frame.rotation % 360:
                        array = np.ascontiguousarray(np.rot90(array, k=round(frame.rotation / 90)))
                    seconds = frame.time if frame.time is not None else self.decoded / float(self.rate or 25)
                    yield VideoFrame(array, str(folder / FRAME_NAME.format(index=self.decoded)), self.decoded,
                                     float(seconds))
                    self.decoded += 1
        finally:
            container.close()

    @property
    def problem(self) -> str | None:
        """After decoding: what was lost, in a few words, or None when the whole video was decoded."""
        parts = []
        if self.bad_packets:
            parts.append(f"{self.bad_packets} undecodable packet{'s' if self.bad_packets > 1 else ''} skipped")
        if self.declared and self.decoded < self.declared:
            parts.append(f"{self.decoded} of the {self.declared} frames its header declares decoded")
        return "; ".join(parts) or None


class VideoEncoder:
    """
    An H.264 MP4 (libx264, yuv420p, ``+faststart``) that common players open, written to a temporary name and
    renamed when :meth:`close` completes, so a crash never leaves half a video under the final name. Each frame
    keeps its presentation time (variable frame rates survive). H.264 in 4:2:0 needs even sides: a frame of odd
    width or height is padded by one edge pixel.

    Args:
        path: the ``.mp4`` to write.
        width, height: the frames' size.
        rate: the nominal frame rate (the stream's ``average_rate``).
        crf: libx264's constant rate factor (lower: larger, closer to the frames).
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, rate: Fraction | float = 25, crf: int = 23):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.part")
        self.size = (height, width)
        self.container = av.open(str(self.tmp), "w", format="mp4", options={"movflags": "+faststart"})
        rate = Fraction(rate).limit_denominator(100000)
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.time_base = Fraction(1, 90000)  # MPEG's clock: any source timestamp to 11 µs
        self.stream.codec_context.time_base = self.time_base
        self._last_pts = -1

    def write(self, rgb: np.ndarray, seconds: float) -> None:
        """Add one (H, W, 3) uint8 frame shown at ``seconds``."""
        if rgb.shape[:2] != self.size:
            raise ValueError(f"frame of size {rgb.shape[:2]} in a video of size {self.size}.")
        pad = ((0, self.size[0] % 2), (0, self.size[1] % 2), (0, 0))
        frame = av.VideoFrame.from_ndarray(np.pad(rgb, pad, mode="edge") if any(p[1] for p in pad) else rgb,
                                           format="rgb24")
        pts = max(round(seconds / self.time_base), self._last_pts + 1)  # strictly increasing, as muxers demand
        frame.pts, frame.time_base, self._last_pts = pts, self.time_base, pts
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> Path:
        """Flush the encoder, close the file and give it its name."""
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and remove the unfinished file."""
        try:
            self.container.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class FrameStream(torch.utils.data.IterableDataset):
    """
    The frames of an inference run as one stream, each passed through ``transform`` (the preprocessing) in the
    loader's workers: still images, the frames of each frame folder in order, and the frames of each video decoded
    as a stream (:class:`VideoDecoder`), so memory stays flat whatever a video's length.

    Each item is ``{"image": path or VideoFrame, "source": str, "kind": "image" | "frames" | "video", "frame": int,
    "time": float, "last": bool, "problem": str, "decode_seconds": float}``: the input it comes from, the frame's
    index and time in it (a frame folder's frames are ``frame_rate`` apart; a still image is frame 0 at time 0),
    whether it is the input's last frame and, on that one, what could not be decoded (empty when nothing).

    Workers share the inputs, not the frames: input ``i`` goes to worker ``i % num_workers``, so each video is
    decoded once and its frames arrive in order (the frames of different inputs may interleave).

    Args:
        inputs: :meth:`scripts.data.FrameList.scan`'s list: ``{"kind": "image", "image": path}``,
            ``{"kind": "frames", "source": folder, "frames": [path, ...]}`` or ``{"kind": "video", "source": path}``.
        transform: applied to each item (``LoadImaged`` first: it reads a path or a :class:`VideoFrame`).
        frame_rate: frames per second of frame folders, which carry no time.
    """

    def __init__(self, inputs: Sequence[Mapping], transform: Callable | None = None, frame_rate: float = 25.0):
        super().__init__()
        if not is_number(frame_rate) or not frame_rate > 0:  # a string override too: one line, not a TypeError
            raise InputError(f"--frame_rate must be a positive number of frames per second, got {frame_rate!r}.")
        self.inputs = list(inputs)
        self.transform = transform
        self.frame_rate = float(frame_rate)

    def _frames(self, entry: Mapping, decoder: VideoDecoder | None) -> Iterator[tuple[object, int, float]]:
        """(image, index, seconds) of each frame of one input, decoded lazily."""
        if entry["kind"] == "image":
            yield entry["image"], 0, 0.0
        elif entry["kind"] == "frames":
            for index, path in enumerate(entry["frames"]):
                yield str(path), index, index / self.frame_rate
        else:
            for frame in decoder:
                yield frame, frame.index, frame.time

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for entry in self.inputs[worker::workers]:
            source = str(entry.get("source", entry.get("image")))
            decoder = VideoDecoder(source) if entry["kind"] == "video" else None
            frames = self._frames(entry, decoder)
            began = time.perf_counter()
            held = next(frames, None)  # one frame of look-ahead: an item knows whether it is the last
            while held is not None:
                following = next(frames, None)
                last = following is None  # and then a video's decoder has seen the whole file
                image, index, seconds = held
                item = {"image": image, "source": source, "kind": entry["kind"], "frame": index, "time": seconds,
                        "last": last, "problem": (decoder.problem or "") if last and decoder is not None else "",
                        "decode_seconds": time.perf_counter() - began}
                yield apply_transform(self.transform, item) if self.transform is not None else item
                began = time.perf_counter()
                held = following


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels within ``width`` of the mask's boundary, inside it: (H, W) bool."""
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=1)


class _Video:
    """What :class:`VideoReport` keeps for one video or frame folder while its frames come in."""

    def __init__(self, source: str, kind: str, folder: Path, columns: Sequence[str]) -> None:
        self.source, self.kind, self.folder = source, kind, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / "frames.csv"
        self.csv_tmp = folder / ".frames.csv.part"  # appended a row a frame, renamed when the video is done
        self.csv_file = open(self.csv_tmp, "w", newline="")
        self.csv = csv.writer(self.csv_file)
        self.csv.writerow(columns)
        self.decoder: VideoDecoder | None = None  # a video's frames decoded again for the overlay
        self.pixels: Iterator[VideoFrame] | None = None
        self.encoder: VideoEncoder | None = None
        self.smoothed: np.ndarray | None = None

    def finish(self) -> None:
        self.csv_file.close()
        os.replace(self.csv_tmp, self.csv_path)
        if self.encoder is not None:
            self.encoder.close()

    def abort(self) -> None:
        self.csv_file.close()
        if self.encoder is not None:
            self.encoder.abort()


class VideoReport:
    """
    The per-video outputs of inference (``configs/inference.yaml``), for each video file and frame folder of the
    input, in ``output_dir/<stem>/`` beside the frames' masks (``<frame>_mask.png``, written by ``SaveImaged``):

    - ``frames.csv``: a row per frame, ``frame, time_s, polyp, area_fraction, max_probability, bbox_x0, bbox_y0,
      bbox_x1, bbox_y1`` (the mask's box in pixels, inclusive; empty without a polyp) and, with MC dropout
      (``mc_samples`` > 0), ``mean_mi`` (mean mutual information over the predicted polyp); with ``smoothing`` > 0
      also ``polyp_smoothed, area_fraction_smoothed``. Rows are appended as frames complete (to
      ``.frames.csv.part``, renamed to ``frames.csv`` after the last one).
    - ``overlay.mp4``: the frames at their size and times with the mask's outline in green and, with MC dropout,
      the mutual information as a magma tint (opaque from a quarter of its maximum, log 2, down); H.264, which
      common players open.
    - with ``smoothing`` > 0, ``smoothed/<frame>_mask.png``: the masks of the exponentially smoothed probability
      ``s_t = (1 - smoothing)·p_t + smoothing·s_{t-1}`` (``s_0 = p_0``), ``>= 0.5``. The overlay then outlines
      the smoothed mask; the raw masks and columns are always kept.

    Still images are left to the other handlers. At the end the rates of decoding (in the loader's workers, if any),
    inference (the network and ``postprocessing``, masks included) and this report (overlay encoding and CSV) are
    logged in frames per second. A video whose decoding lost packets or frames is named in a warning and recorded
    in ``inputs`` (:meth:`scripts.data.FrameList.check_all_written` then names it).

    Args:
        output_dir: the inference output folder.
        reader: the image reader (frame folders' frames are read again for the overlay).
        inputs: the run's :class:`scripts.data.FrameList`.
        smoothing: weight of the past in the exponential smoothing, in [0, 1); 0 (default): none.
        frame_rate: frames per second of frame folders' overlays (FrameStream's ``frame_rate``).
        prefix: prefix of the output keys ``SplitDimd`` makes (``pred_probability``, ``pred_mutual_information``).
        mask_key: key of the binary mask in the output items.
    """

    COLUMNS = ("frame", "time_s", "polyp", "area_fraction", "max_probability", "bbox_x0", "bbox_y0", "bbox_x1",
               "bbox_y1")

    def __init__(self, output_dir: str | os.PathLike, reader, inputs=None, smoothing: float = 0.0,
                 frame_rate: float = 25.0, prefix: str = "pred_", mask_key: str = "pred") -> None:
        if not is_number(smoothing) or not 0 <= smoothing < 1:
            raise InputError(f"--smoothing must be a number in [0, 1) (the weight of the past frames; 0: off), "
                             f"got {smoothing!r}.")
        self.output_dir = Path(output_dir)
        self.reader, self.inputs, self.smoothing = reader, inputs, float(smoothing)
        self.frame_rate = frame_rate  # of frame folders' overlays, as FrameStream's
        self.prefix, self.mask_key = prefix, mask_key
        self.open: dict[str, _Video] = {}
        self.seconds = {"decode": 0.0, "inference": 0.0, "report": 0.0}
        self.frames = 0
        self._began = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_STARTED, self._tick)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._summary)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._abort)

    def _start(self, engine: Engine) -> None:
        self.open, self.frames = {}, 0
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def _tick(self, engine: Engine) -> None:
        self._began = time.perf_counter()

    def _abort(self, engine: Engine, error: Exception) -> None:
        for video in self.open.values():
            video.abort()
        self.open = {}
        raise error

    def _columns(self, mc: bool) -> list[str]:
        return [*self.COLUMNS, *(["mean_mi"] if mc else []),
                *(["polyp_smoothed", "area_fraction_smoothed"] if self.smoothing else [])]

    def _video(self, batch: Mapping, mc: bool) -> _Video:
        source = batch["source"]
        if source not in self.open:
            folder = self.output_dir / output_name(source, batch["kind"])
            self.open[source] = _Video(source, batch["kind"], folder, self._columns(mc))
        return self.open[source]

    def _pixels(self, video: _Video, batch: Mapping, name: str) -> np.ndarray:
        """
        The frame's own (H, W, 3) pixels, for the overlay: read or decoded again here, in step with the loader.
        The loader's items hold the frame resized to the network's input, and a batch cannot carry frames of
        different sizes; decoding a frame costs a few milliseconds beside inference's tens to hundreds.
        """
        if video.kind == "frames":
            array, _ = self.reader.get_data(self.reader.read(name))
            return np.asarray(array).transpose(1, 0, 2)  # PIL order (W, H, C) to (H, W, C)
        if video.pixels is None:
            video.decoder = VideoDecoder(video.source)
            video.pixels = iter(video.decoder)
        frame = next(video.pixels)
        if frame.index != batch["frame"]:
            raise RuntimeError(f"the overlay of {video.source} fell out of step: frame {frame.index} decoded for "
                               f"frame {batch['frame']}.")
        return frame.array

    def __call__(self, engine: Engine) -> None:
        if not isinstance(engine.state.batch, list):  # not FrameStream's decollated frames: MONAI Label's one image
            return
        inference = time.perf_counter() - self._began
        began = time.perf_counter()
        counted = 0
        for batch, item in zip(engine.state.batch, engine.state.output):
            if batch.get("kind", "image") == "image":  # still images: the other handlers'
                continue
            counted += 1
            self.seconds["decode"] += float(batch["decode_seconds"])
            mc = f"{self.prefix}mutual_information" in item
            video = self._video(batch, mc)
            self._frame(video, batch, item, mc)
            if batch["last"]:
                if batch["problem"]:
                    self._damaged(video, batch["problem"])
                video.finish()
                del self.open[video.source]
        if counted:
            self.frames += counted
            self.seconds["inference"] += inference * counted / len(engine.state.output)
            self.seconds["report"] += time.perf_counter() - began

    def _frame(self, video: _Video, batch: Mapping, item: Mapping, mc: bool) -> None:
        name = str(item[self.mask_key].meta["filename_or_obj"])
        # (W, H) in MONAI/PIL order: transposed to the frame's (H, W)
        probability = item[f"{self.prefix}probability"].detach().cpu().numpy()[0].T
        mask = np.asarray(item[self.mask_key].detach().cpu().numpy()).reshape(probability.T.shape).T > 0.5
        ys, xs = np.nonzero(mask)
        box = [xs.min(), ys.min(), xs.max(), ys.max()] if len(xs) else ["", "", "", ""]
        row = [batch["frame"], f"{batch['time']:.6f}", int(mask.any()), f"{mask.mean():.6f}",
               f"{probability.max():.6f}", *box]
        mi = None
        if mc:
            mi = item[f"{self.prefix}mutual_information"].detach().cpu().numpy()[0].T
            row.append(f"{mi[mask].mean():.6g}" if mask.any() else "")
        shown = mask
        if self.smoothing:
            video.smoothed = probability if video.smoothed is None else \
                (1 - self.smoothing) * probability + self.smoothing * video.smoothed
            shown = video.smoothed >= 0.5
            row += [int(shown.any()), f"{shown.mean():.6f}"]
            with atomic_path(video.folder / "smoothed" / f"{Path(name).stem}_mask.png") as tmp:
                Image.fromarray(shown.astype(np.uint8) * 255).save(tmp, format="PNG")
        video.csv.writerow(row)
        video.csv_file.flush()  # a run stopped part-way keeps its rows (in .frames.csv.part)
        pixels = self._pixels(video, batch, name)
        if pixels.shape[:2] != mask.shape:
            raise RuntimeError(f"frame {name}: its pixels ({pixels.shape[:2]}) and mask ({mask.shape}) differ.")
        if video.encoder is None:
            rate = video.decoder.rate if video.decoder is not None and video.decoder.rate else self.frame_rate
            video.encoder = VideoEncoder(video.folder / "overlay.mp4", mask.shape[1], mask.shape[0], rate=rate)
        video.encoder.write(self.overlay(pixels, shown, mi), float(batch["time"]))

    @staticmethod
    def overlay(pixels: np.ndarray, mask: np.ndarray, mi: np.ndarray | None = None) -> np.ndarray:
        """
        The frame with the mask's outline in green and, given ``mi``, the mutual information as a magma tint whose
        opacity grows to 0.6 at a quarter of its maximum (log 2). (H, W, 3) uint8 in and out; (H, W) maps.
        """
        out = pixels.astype(np.float32)
        if mi is not None:
            from scripts.figures import colour_map

            alpha = 0.6 * np.clip(mi / (math.log(2) / 4), 0.0, 1.0)[..., None]
            out = (1 - alpha) * out + alpha * colour_map(mi, "mutual_information").astype(np.float32)
        out[_outline(mask, max(1, min(mask.shape) // 150))] = (0, 255, 0)
        return out.round().astype(np.uint8)

    def _damaged(self, video: _Video, problem: str) -> None:
        logger.warning(f"video {video.source}: {problem}; the frames that could be decoded are written")
        if self.inputs is not None:
            self.inputs.damaged.append((Path(video.source), problem))

    def _summary(self, engine: Engine) -> None:
        for video in list(self.open.values()):  # a stream that ended without its last item: keep what was written
            video.finish()
        self.open = {}
        if not self.frames:
            return
        rate = lambda key: f"{self.frames / self.seconds[key]:.1f}" if self.seconds[key] else "-"  # noqa: E731
        logger.info(f"{self.frames} video frames: decoding {rate('decode')} frames/s, "
                    f"inference {rate('inference')} frames/s, overlay and report {rate('report')} frames/s")
