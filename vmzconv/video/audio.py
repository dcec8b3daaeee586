"""The audio input of VMZ's audio-visual models: log-mels as Caffe2's ``AVInput`` op computed them.

Every constant is VMZ's (``ops/`` of facebookresearch/VMZ):

* decoding (``av_decoder.h`` ``Params``, ``av_decoder.cc``): the file's first audio stream, every packet to the
  end, converted by libswresample to ``outrate_ = 16000`` Hz, ``outlayout_ = AV_CH_LAYOUT_MONO``,
  ``outfmt_ = AV_SAMPLE_FMT_FLT`` (float samples in [-1, 1]); one ``swr_convert`` per decoded frame and no
  final flush. Here: PyAV's ``AudioResampler`` (libswresample through FFmpeg's ``aresample``) to the same.
* the spectrum (``LogMels.cc``, ``LogSpectrum``; arguments from ``av_input_op.h``: ``kNumLogMelFilters = 40``,
  ``kWindowLength = 16`` ms, ``kWindowStep = 10`` ms, ``kAudioSamplingRate = 16000``): windows of
  int(16 * 16000 / 1000) = 256 samples every 160, taken while *more* than 256 samples remain; a symmetric Hann
  window 0.5 * (1 - cos(2 pi i / (256 - 1))); a 256-point real FFT (FFmpeg's ``av_rdft``, whose packed output
  puts the Nyquist term beside the DC one, so bin 0's power is DC^2 + Nyquist^2); power |X_k|^2 for k < 128;
  40 triangular mel filters (mel = 1127 ln(1 + f / 700)) from 0 Hz to 8000 Hz, each normalised to sum 1,
  placed on a frequency step of 8000 / 129 Hz (``samplingRate / 2 / filterLength``, not / 128), applied over
  [from, to) of the range they were built on; times ``kGain = 1080674186.3482928``; then ln(x) when x > e,
  else x / e. The filters are built in float32 as the C++ does.
* alignment (``av_io.cc``, ``ClipTransformAudioLogmel``, ``align_audio = 1``, "perfect alignment", the op's
  default): the whole track's log-mel frames are resized (OpenCV, linear when stretching, nearest when
  shrinking) to ``rows = F * 100 // S`` frames, F the video's frame count and S the clip's span in frames,
  so that one clip spans exactly ``kNumLogMelFrames = 100`` rows; a clip starting at frame s reads rows
  from ``s * rows // F`` (the op's start-frame formula), zero-padded past the end. The input is 1 x 100 x 40
  (channel x time x frequency), not normalised further.

Not pinned from the source: with several clips per video (``DO_UNIFORM_SMP``) the op spreads the audio
starts as floor(i * (rows - 100) / (n - 1)) rather than from each clip's start frame; the two agree to a row
or so on VMZ's uniformly spaced clips, and vmzconv uses the start-frame formula for every clip and window.
"""

from __future__ import annotations

import math

import numpy as np

from .decode import DecodeError, _av_errors, open_container

SAMPLE_RATE = 16000           # av_decoder.h outrate_; av_input_op.h kAudioSamplingRate
MEL_FILTERS = 40              # av_input_op.h kNumLogMelFilters
MEL_FRAMES = 100              # av_input_op.h kNumLogMelFrames
WINDOW_MS, STEP_MS = 16, 10   # av_input_op.h kWindowLength, kWindowStep
GAIN = 1080674186.3482928     # LogMels.cc kGain
WINDOW = int(WINDOW_MS * SAMPLE_RATE / 1000.0)      # 256 samples (LogSpectrum's windowLength_)
STEP = int(STEP_MS * SAMPLE_RATE / 1000.0)          # 160
FFT = 1 << math.ceil(math.log2(WINDOW))             # 256
BINS = FFT // 2 + 1                                 # filterLength_ = 129


def _mel_filters() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """LogSpectrum::Init in float32: the [40, 129] filter bank and each filter's (from, to)."""
    f32 = np.float32

    def hz2mel(hz):
        return f32(1127) * f32(np.log(f32(1) + f32(hz) / f32(700)))

    def mel2hz(mel):
        return f32(700) * (f32(np.exp(f32(mel) / f32(1127))) - f32(1))

    start_mel, end_mel = hz2mel(f32(0)), hz2mel(f32(SAMPLE_RATE * 0.5))
    dx = (end_mel - start_mel) / f32(MEL_FILTERS + 1)
    freq_step = f32(SAMPLE_RATE) / f32(2) / f32(BINS)
    filters = np.zeros((MEL_FILTERS, BINS), np.float32)
    ranges = []
    for k in range(MEL_FILTERS):
        start, mid, end = (mel2hz(f32(k + d) * dx) / freq_step for d in (0, 1, 2))
        lo, hi = max(0, int(start)), min(BINS - 1, int(end) + 1)
        left, right = max(f32(1), mid - start), max(f32(1), end - mid)
        total = f32(0)
        for i in range(lo, hi + 1):
            value = f32(1) - ((mid - f32(i)) / left if f32(i) < mid else (f32(i) - mid) / right)
            if value > 0:
                filters[k, i] = value
                total += value
        if total > 0:
            filters[k, lo:hi + 1] /= total
        ranges.append((lo, hi))
    return filters, ranges


_FILTERS, _RANGES = _mel_filters()
_HANN = (0.5 * (1 - np.cos(2 * np.pi * np.arange(WINDOW) / (WINDOW - 1)))).astype(np.float32)
_MASK = np.zeros((MEL_FILTERS, BINS), bool)
for _k, (_lo, _hi) in enumerate(_RANGES):
    _MASK[_k, _lo:_hi] = True                         # Apply() sums j in [from, to)
_BANK = np.where(_MASK, _FILTERS, 0).astype(np.float32)


def logmel_frames(samples: np.ndarray) -> np.ndarray:
    """Log-mel frames [R, 40] (float32) of 16 kHz mono float samples, one per 10 ms as LogSpectrum::Read
    gives them."""
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    count = max(0, -(-(x.size - WINDOW) // STEP)) if x.size > WINDOW else 0      # while size - k*STEP > WINDOW
    if count == 0:
        return np.zeros((0, MEL_FILTERS), np.float32)
    idx = np.arange(count)[:, None] * STEP + np.arange(WINDOW)[None, :]
    frames = x[idx] * _HANN                                                      # float32, as tempFrame_
    spec = np.fft.rfft(frames, n=FFT, axis=1)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    power[:, 0] = np.float32(spec[:, 0].real ** 2 + spec[:, FFT // 2].real ** 2)   # av_rdft's packed bin 0
    power[:, FFT // 2] = 0                                                       # never read (to < 129)
    feat = (power[:, None, :] * _BANK[None]).astype(np.float64).sum(axis=2) * GAIN
    out = np.where(feat > math.e, np.log(np.maximum(feat, math.e)), feat / math.e)
    return out.astype(np.float32)


def decode_audio(path: str) -> np.ndarray | None:
    """The file's first audio stream as 16 kHz mono float32 samples, or None when it has no audio stream."""
    import av

    with open_container(path) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        parts = []
        try:
            for frame in container.decode(container.streams.audio[0]):
                frame.pts = None                 # sample counts, not timestamps, as swr_convert sees them
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
        except _av_errors() as e:
            raise DecodeError(f"{path}: cannot decode its audio: {e}") from None
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def aligned_rows(frames: np.ndarray, num_frames: int, span: int) -> np.ndarray:
    """The log-mel frames resized so that ``span`` video frames cover 100 rows (``align_audio = 1``)."""
    import cv2

    rows = num_frames * MEL_FRAMES // max(1, span)
    if frames.shape[0] == 0 or rows < 1:
        return np.zeros((0, MEL_FILTERS), np.float32)
    interp = cv2.INTER_LINEAR if rows >= frames.shape[0] else cv2.INTER_NEAREST
    return cv2.resize(np.ascontiguousarray(frames, np.float32), (MEL_FILTERS, rows), interpolation=interp)


def clip_logmels(rows: np.ndarray, num_frames: int, starts) -> np.ndarray:
    """[len(starts), 1, 100, 40]: for a clip starting at video frame s, rows s * R // F onwards (R rows in
    all), zero-padded to 100."""
    out = np.zeros((len(starts), 1, MEL_FRAMES, MEL_FILTERS), np.float32)
    r = rows.shape[0]
    for i, s in enumerate(starts):
        a = int(s) * r // max(1, num_frames)
        part = rows[a:a + MEL_FRAMES]
        out[i, 0, :part.shape[0]] = part
    return out


class Track:
    """One video's audio for the audio-visual models: its aligned log-mel rows, or silence (zeros) when
    ``silent`` and the file has no audio stream (only then)."""

    def __init__(self, path: str, num_frames: int, span: int, silent_ok: bool):
        samples = decode_audio(path)
        frames = None if samples is None else logmel_frames(samples)
        self.silent = frames is None or frames.shape[0] == 0        # no stream, or under one 16 ms window of it
        if self.silent and not silent_ok:
            what = "no audio stream" if samples is None else f"an audio stream of {samples.size} samples (no log-mel frame)"
            raise DecodeError(f"{path}: {what}, and this audio-visual model needs sound "
                              "(--silent-audio feeds it zeros instead, and marks the output)")
        self.num_frames = num_frames
        self.rows = (np.zeros((0, MEL_FILTERS), np.float32) if self.silent
                     else aligned_rows(frames, num_frames, span))

    def clips(self, starts) -> np.ndarray:
        return clip_logmels(self.rows, self.num_frames, starts)
