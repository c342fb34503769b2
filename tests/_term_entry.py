"""Entry for tests/test_scale_bad_input.py::test_sigterm_cleans_up: the CLI, where the run stops after its
first finished layer is written into the artifact being built (a marker file says so) until SIGTERM comes."""
import sys
import time
from pathlib import Path

from mmcompress import cli, streaming

marker = Path(sys.argv[1])
real = streaming.LayerStream.write_layer


def write_then_wait(self, *a, **k):
    r = real(self, *a, **k)
    marker.write_text("written")
    while True:
        time.sleep(0.05)


streaming.LayerStream.write_layer = write_then_wait
sys.exit(cli.main(sys.argv[2:]))
