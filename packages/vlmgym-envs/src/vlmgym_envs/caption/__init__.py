"""Image captioning: the environment (`env`, registered as `caption`) and its CIDEr-D and
keyword rewards (`cider`)."""
