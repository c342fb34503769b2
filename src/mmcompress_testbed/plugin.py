"""The testbed as an mmcompress plugin (entry point ``mmcompress.plugins: testbed`` in pyproject.toml).

Imports nothing: the product reads these tables when it builds its command line and imports the
modules named here only when a testbed subcommand runs or a testbed set name is looked up
(:mod:`mmcompress.plugins`)."""

COMMANDS = {
    "testbed": ("mmcompress_testbed.cli", "real small models and text data without a model hub (list, fetch)"),
    "demo": ("mmcompress_testbed.demo", "RTN vs SmoothQuant vs MASQuant (W4A8, omni-mini) and dense vs TEAL vs "
                                        "LaRoSA (40%%, smollm2-135m) on real models, one table and a report"),
}

# --calib wiki|testbed|testbed-whiten|testbed-heldout, --ppl wiki|shakespeare, --asr speech-test, --vqa image-qa-test
NAMED_SETS = ["mmcompress_testbed.sets"]
