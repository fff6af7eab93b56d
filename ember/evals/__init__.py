"""Evals: graders (string checks, text similarity, a sandboxed Python function, LLM judges, a pairwise
judge), bootstrap confidence intervals, and `compare`, which scores two models on the same items (the
flywheel's gate). The /v1/evals routes (ember.server.evals_api) run on the same pieces."""
