"""Running loaded models: the decode engine (:mod:`.decode`)."""
