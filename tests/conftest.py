import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests never write the user's token cache (~/.cache/mmcompress/tokens); tests/test_token_cache.py turns it
# on in a temporary MMCOMPRESS_CACHE
os.environ["MMCOMPRESS_NO_TOKEN_CACHE"] = "1"
# remote code that tests load with trust_remote_code (tests/_remote.py) is copied here, not into ~/.cache
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), f"mmcompress-tests-hf-modules-{os.getuid()}"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Triton's CPU interpreter (tests/test_triton_interpret.py) needs TRITON_INTERPRET before anything imports
# triton (compressed_tensors does, at collection).  Only without CUDA, where compiled Triton cannot run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .tiny_models import tiny_model, tiny_processor, tiny_tokenizer  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Every test starts with the session's torch thread count: an in-process CLI call with ``--threads``
    (``bench decode``, ``generate``) sets it for the process, and the numbers of every later test that runs
    float GEMMs (a calibration's round-off) would depend on the order the tests ran in."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def pytest_configure(config):
    from importlib.metadata import entry_points

    if not entry_points(group="mmcompress.plugins"):  # installed before the testbed became a plugin
        pytest.exit('the installed mmcompress metadata has no "mmcompress.plugins" entry point (the testbed '
                    'plugs in through it): run  pip install -e ".[test]"  again', returncode=4)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


def make_image(seed=0, size=112):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def make_audio(seconds=2.0, freq=440.0):
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path, seconds=1.5):
    """:func:`make_audio` as a 16 kHz mono 16-bit WAV file (for .jsonl calibration files)."""
    import wave

    pcm = (make_audio(seconds) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def mm_inputs(kind, tok, seed=0, text=" the quick brown fox jumps"):
    """Processor output (image, and audio for Omni) for a tiny multimodal model."""
    proc = tiny_processor(kind, tok)
    kwargs = {"images": [make_image(seed)]}
    prefix = "<|vision_start|><|image_pad|><|vision_end|>"
    if kind == "qwen2_5_omni":
        kwargs["audio"] = [make_audio(1.0 + seed * 0.5)]
        prefix += "<|audio_bos|><|AUDIO|><|audio_eos|>"
    enc = proc(text=[prefix + text], return_tensors="pt", **kwargs)
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}, proc


def text_samples(tok, n=4, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, len(tok) - 10, (1, seqlen), generator=g)} for _ in range(n)]


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from .tiny_models import save_tiny

    return save_tiny(tmp_path / "tiny-llama", "llama", layers=3)


@pytest.fixture
def calib_text(tmp_path):
    p = tmp_path / "calib.txt"
    words = "the quick brown fox jumps over the lazy dog and a model compresses weights with care".split()
    rng = np.random.default_rng(0)
    p.write_text(" ".join(rng.choice(words, size=3000)))
    return p
