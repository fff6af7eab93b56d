"""The Responses API: a conversation of items run as chat turns on the engine, with the MCP tool loop on the
server (run.py), the tools it offers (tools.py), the items' chat form (items.py), and the MCP client
(mcp.py)."""
