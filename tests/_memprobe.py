"""Run one quantization in a fresh process and print the peak extra RSS (used by test_engine)."""
import json
import sys
import threading
import time

import psutil
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from tiny_models import tiny_model  # tests/, this script's directory

layers, method = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
model, tok = tiny_model("llama", layers=layers, hidden=512, intermediate=2048, heads=8, kv_heads=8)
calib = CalibrationSet([{"input_ids": torch.randint(0, 400, (1, 64), generator=torch.Generator().manual_seed(i))}
                        for i in range(4)])
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
done = threading.Event()


def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)


t = threading.Thread(target=sample)
t.start()
mmcompress.quantize(model, calib, method, "w8a8", progress=False)
done.set()
t.join()
layer_bytes = sum(p.numel() * 4 for p in tiny_model("llama", layers=1, hidden=512, intermediate=2048, heads=8,
                                                     kv_heads=8)[0].model.layers[0].parameters())
print(json.dumps({"extra_peak": peak[0] - base, "layer_bytes": layer_bytes}))
