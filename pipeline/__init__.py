"""Audio front-end, data and training loop."""
