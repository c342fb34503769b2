"""Runs inside the llama.cpp venv (benchmarks/llamacpp_env.sh): perplexity of a GGUF model on given token
windows, or greedy decode speed.  Prints one JSON object.  Called by gguf_verify.py and llamacpp_compare.py.

    python llamacpp_run.py ppl MODEL.gguf IDS.json --threads 2
    python llamacpp_run.py decode MODEL.gguf --prompt-ids 1,2,3 --tokens 64 --threads 2 --repeats 3
    python llamacpp_run.py quantize IN.gguf OUT.gguf q4_0      (llama.cpp's llama-quantize, via its C API)

``--no-extra-bufts`` loads the model with llama.cpp's ``use_extra_bufts = false`` (no AMX or repacked Q4_0
weights: the plain CPU buffers); decode prints llama.cpp's system-info line with its result.
"""

import argparse
import json
import math
import time


def main():
    import numpy as np
    from llama_cpp import Llama

    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ppl", "decode", "quantize"])
    ap.add_argument("model")
    ap.add_argument("ids", nargs="?")
    ap.add_argument("qtype", nargs="?")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-ids", default="")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--no-extra-bufts", action="store_true")
    a = ap.parse_args()
    if a.no_extra_bufts:  # Llama() has no argument for it: patch the defaults it starts from
        import llama_cpp.llama_cpp as C

        default = C.llama_model_default_params

        def no_extra():
            p = default()
            p.use_extra_bufts = False
            return p

        C.llama_model_default_params = no_extra
    if a.mode == "quantize":
        import ctypes

        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{a.qtype.upper()}")
        params.nthread = a.threads
        rc = llama_cpp.llama_model_quantize(a.model.encode(), a.ids.encode(), ctypes.byref(params))
        print(json.dumps({"quantize": a.qtype, "rc": int(rc)}))
        return rc
    if a.mode == "ppl":
        windows = json.load(open(a.ids))
        llm = Llama(model_path=a.model, n_ctx=max(len(w) for w in windows) + 8, logits_all=True,
                    n_threads=a.threads, verbose=False)
        nll, n = 0.0, 0
        for w in windows:
            llm.reset()
            llm.eval(w)
            logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
            n += len(w) - 1
        print(json.dumps({"ppl": math.exp(nll / n), "tokens": n}))
        return
    prompt = [int(t) for t in a.prompt_ids.split(",") if t]
    llm = Llama(model_path=a.model, n_ctx=a.ctx, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:  # llm.scores stays zero without logits_all: read the last row from llama.cpp
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    best, prefill_best = 0.0, 0.0
    for _ in range(a.repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = last_argmax()
        text_ids = [tok]
        for _ in range(a.tokens):
            llm.eval([tok])
            tok = last_argmax()
            text_ids.append(tok)
        t2 = time.perf_counter()
        best = max(best, a.tokens / (t2 - t1))
        prefill_best = max(prefill_best, len(prompt) / (t1 - t0))
    import llama_cpp

    print(json.dumps({"tok_s": best, "prefill_tok_s": prefill_best, "tokens": a.tokens, "prompt": len(prompt),
                      "extra_bufts": not a.no_extra_bufts, "text_ids": text_ids,
                      "system_info": llama_cpp.llama_print_system_info().decode().strip()}))


if __name__ == "__main__":
    raise SystemExit(main())
