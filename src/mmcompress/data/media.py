"""Reading images and audio for calibration and evaluation (no network, no torchvision)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


def load_image(src):
    """A PIL RGB image from a path or an existing image/array."""
    from PIL import Image

    if isinstance(src, (str, Path)):
        with Image.open(src) as im:
            return im.convert("RGB")
    if isinstance(src, np.ndarray):
        return Image.fromarray(src).convert("RGB")
    return src.convert("RGB")


def load_audio(src, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at ``sample_rate`` from a PCM WAV path or an array."""
    if not isinstance(src, (str, Path)):
        return np.asarray(src, dtype=np.float32)
    path = Path(src)
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except wave.Error:
        try:
            import soundfile as sf
        except ImportError:
            raise ValueError(f"{path}: only PCM WAV is supported without the soundfile package") from None
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        x = data.mean(1)
    else:
        dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
        if dtype is None:
            raise ValueError(f"{path}: unsupported WAV sample width {width}")
        x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
        if width == 1:
            x = (x - 128.0) / 128.0
        else:
            x /= float(2 ** (8 * width - 1))
        x = x.reshape(-1, channels).mean(1)
    if rate != sample_rate and len(x):
        t_new = np.arange(int(round(len(x) * sample_rate / rate))) / sample_rate
        x = np.interp(t_new, np.arange(len(x)) / rate, x).astype(np.float32)
    return x.astype(np.float32)
