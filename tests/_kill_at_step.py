"""Run the mmcompress CLI in a child process and SIGKILL it at a named commit step (crash-safety tests).

The product has no kill switch: the child installs a :func:`mmcompress.fileio.step_hook` that kills
the process (``kill -9``) when the step ``kill`` is reached (``NAME@K``: its K-th occurrence, from
1), pauses at ``pause`` until the file ``go`` exists, or records every step (``NAME@K``) to ``record``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

# Imported here so that the forkserver (which preloads this module) holds them: a child then starts
# without importing anything (transformers imports model code lazily, ~10 s on a busy machine).
import mmcompress.cli  # noqa: E402,F401
import mmcompress.export.serialization  # noqa: E402,F401
import mmcompress.quant.methods  # noqa: E402,F401
import transformers.models.llama.modeling_llama  # noqa: E402,F401
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig,  # noqa: E402,F401
                          LlamaForCausalLM, PreTrainedTokenizerFast)


def _child(argv, kill=None, pause=None, go=None, record=None, no_exchange=False):
    import torch

    from mmcompress import fileio
    from mmcompress.cli import main

    torch.set_num_threads(1)  # tiny models: threads only spin on a shared machine

    if no_exchange:
        fileio._exchange = lambda a, b: False

    seen: dict[str, int] = {}

    def hook(name):
        seen[name] = seen.get(name, 0) + 1
        name = f"{name}@{seen[name]}"
        if record:
            with open(record, "a") as f:
                f.write(name + "\n")
        if name == kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if name == pause:
            open(go + ".paused", "w").close()
            while not os.path.exists(go):
                time.sleep(0.02)

    with fileio.step_hook(hook):
        code = main([str(a) for a in argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_CTX = None


def context():
    """A forkserver that has imported torch, transformers and mmcompress once (children start in ~0 s)."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload([__name__])
    return _CTX


def start(argv, **kw):
    p = context().Process(target=_child, args=(list(argv),), kwargs=kw)
    p.start()
    return p


def run(argv, timeout=120, **kw) -> int:
    """Exit code of the child (-9 when it was killed)."""
    p = start(argv, **kw)
    p.join(timeout)
    if p.is_alive():
        p.kill()
        raise TimeoutError(f"child did not finish: {argv}")
    return p.exitcode
