"""The HEAR 2021 API over a dclsify checkpoint: ``import dclsify.hear`` as the HEAR tools import a module by
name (the functions live in :mod:`dclsify.pipeline.hear`)."""

from .pipeline.hear import HearModel, get_scene_embeddings, get_timestamp_embeddings, load_model

__all__ = ["HearModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]
