"""The OpenAI protocol: request bodies, response and chunk formatting, tools and tool calls.

Imports no torch and no transformers (tests/protocol/test_layering.py holds it to that), so a gateway, a
pipeline step or a Ray ingress can validate and format requests without loading an engine. Import the
modules themselves (`from ember.protocol.requests import ChatCompletionRequest`): one path per name.
"""
