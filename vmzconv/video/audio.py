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
  default): the whole track's log-mel frames are resized (as OpenCV's resize: linear when stretching,
  nearest when shrinking; only the rows a clip reads are computed) to ``rows = F * 100 // S`` frames, F the
  video's frame count and S the clip's span in frames,
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


def decode_logmels(path: str) -> tuple[np.ndarray, int] | None:
    """Log-mel frames [R, 40] of the file's first audio stream and the count of 16 kHz samples it gave, or None
    when it has no audio stream. The frames are computed while the stream decodes: a frame is taken as soon
    as more than 256 samples follow its start (LogSpectrum::Read's test, which can only stay true as the
    stream goes on), and only the samples of frames still to come are kept."""
    import av

    with open_container(path) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        pending, chunks, total = np.zeros(0, np.float32), [], 0
        try:
            for frame in container.decode(container.streams.audio[0]):
                frame.pts = None                 # sample counts, not timestamps, as swr_convert sees them
                for out in resampler.resample(frame):
                    part = out.to_ndarray().reshape(-1).astype(np.float32)
                    total += part.size
                    pending = np.concatenate([pending, part])
                    done = logmel_frames(pending)
                    if done.shape[0]:
                        chunks.append(done)
                        pending = pending[done.shape[0] * STEP:]
        except _av_errors() as e:
            raise DecodeError(f"{path}: cannot decode its audio: {e}") from None
    return (np.concatenate(chunks) if chunks else np.zeros((0, MEL_FILTERS), np.float32)), total


class Aligned:
    """The log-mel frames resized so that ``span`` video frames cover 100 rows (``align_audio = 1``): ``rows``
    = F * 100 // span rows, as OpenCV's resize makes them (linear, half-pixel centres, when stretching;
    nearest when shrinking), computed for the rows a clip reads rather than for the whole track."""

    def __init__(self, frames: np.ndarray, num_frames: int, span: int):
        self.frames = np.ascontiguousarray(frames, np.float32)
        self.rows = num_frames * MEL_FRAMES // max(1, span) if self.frames.shape[0] else 0

    def take(self, start: int, n: int) -> np.ndarray:
        """Rows ``start`` .. ``start + n - 1`` (fewer past the end)."""
        src_rows = self.frames.shape[0]
        idx = np.arange(start, min(start + n, self.rows), dtype=np.float64)
        if idx.size == 0:
            return np.zeros((0, MEL_FILTERS), np.float32)
        inv_scale = self.rows / src_rows                   # OpenCV's inv_scale_y; its scale is 1 / that
        if self.rows < src_rows:                            # INTER_NEAREST: floor(y * scale), clamped
            return self.frames[np.minimum(np.floor(idx * (1.0 / inv_scale)).astype(np.int64), src_rows - 1)]
        pos = (idx + 0.5) * (1.0 / inv_scale) - 0.5         # INTER_LINEAR
        i0 = np.floor(pos).astype(np.int64)
        frac = (pos - i0).astype(np.float32)
        frac[i0 < 0] = 0
        i0 = np.maximum(i0, 0)
        frac[i0 >= src_rows - 1] = 0
        i0 = np.minimum(i0, src_rows - 1)
        i1 = np.minimum(i0 + 1, src_rows - 1)
        return self.frames[i0] * (1 - frac)[:, None] + self.frames[i1] * frac[:, None]


def clip_logmels(aligned: Aligned, num_frames: int, starts) -> np.ndarray:
    """[len(starts), 1, 100, 40]: for a clip starting at video frame s, rows s * R // F onwards (R rows in
    all), zero-padded to 100."""
    out = np.zeros((len(starts), 1, MEL_FRAMES, MEL_FILTERS), np.float32)
    for i, s in enumerate(starts):
        part = aligned.take(int(s) * aligned.rows // max(1, num_frames), MEL_FRAMES)
        out[i, 0, :part.shape[0]] = part
    return out


class Track:
    """One video's audio for the audio-visual models: its aligned log-mel rows, or silence (zeros) when
    ``silent`` and the file has no audio stream (only then)."""

    def __init__(self, path: str, num_frames: int, span: int, silent_ok: bool):
        decoded = decode_logmels(path)
        frames = np.zeros((0, MEL_FILTERS), np.float32) if decoded is None else decoded[0]
        self.silent = frames.shape[0] == 0                  # no stream, or under one 16 ms window of it
        if self.silent and not silent_ok:
            what = "no audio stream" if decoded is None else f"an audio stream of {decoded[1]} samples (no log-mel frame)"
            raise DecodeError(f"{path}: {what}, and this audio-visual model needs sound "
                              "(--silent-audio feeds it zeros instead, and marks the output)")
        self.num_frames = num_frames
        self.aligned = Aligned(frames, num_frames, span)

    def clips(self, starts) -> np.ndarray:
        return clip_logmels(self.aligned, self.num_frames, starts)
