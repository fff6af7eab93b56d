"""Compound AI pipelines: declared steps of models, adapters, tools, routes and checks, served as a model."""
