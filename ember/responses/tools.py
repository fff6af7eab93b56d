"""The tools a response offers the model: function tools as given, and the tools of the operator's MCP
servers (listed through the hub, or read from the conversation's earlier mcp_list_tools item so that the
prompt stays the same between turns), all as chat function tools, with where each call goes."""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import InvalidRequest
from ember.protocol.responses import HOSTED_TOOLS, ResponseRequest, function_tool, mcp_tool, tool_choice
from ember.responses import items as it


class McpUnavailable(Exception):
    """An MCP server could not list its tools: the request cannot offer them."""

    def __init__(self, label: str, why: str):
        super().__init__(f"could not list the tools of MCP server '{label}': {why}")
        self.label = label


@dataclass
class Tools:
    """What a response offers the model: chat function tools, and where each call goes."""

    chat: list[dict]  # ChatCompletionRequest tools
    echo: list[dict]  # the request's tools as the response object lists them
    mcp: dict[str, tuple[str, str]]  # chat tool name -> (server_label, the MCP tool's own name)
    listed: list[dict]  # mcp_list_tools items this response adds (a server not listed earlier)
    choice: str | dict = "auto"  # chat's tool_choice


async def resolve_tools(req: ResponseRequest, hub, earlier: list[dict]) -> Tools:
    """The request's tools; an mcp tool's list comes from the conversation's mcp_list_tools item where there
    is one (the prompt then stays the same between turns), else from the hub (`state.mcp`)."""
    known = {i["server_label"]: i for i in earlier if i["type"] == "mcp_list_tools" and not i.get("error")}
    tools = Tools([], [], {}, [])
    names: set[str] = set()

    def offer(name: str, description: str | None, parameters: dict | None, where: str) -> None:
        if name in names:
            raise InvalidRequest(f"two tools are named '{name}'; tool names must be unique", param=where)
        names.add(name)
        fn = {"name": name, "parameters": parameters}
        if description:
            fn["description"] = description
        tools.chat.append({"type": "function", "function": fn})

    for i, tool in enumerate(req.tools or []):
        where = f"tools[{i}]"
        kind = tool.get("type")
        if kind == "function":
            spec = function_tool(tool, where)
            tools.echo.append(spec)
            offer(spec["name"], spec["description"], spec["parameters"], where)
        elif kind == "mcp":
            spec, allowed = mcp_tool(tool, where)
            tools.echo.append(spec)
            label = spec["server_label"]
            if hub is None or label not in hub.labels:
                have = ", ".join(hub.labels) if hub is not None and hub.labels else "none (see --mcp)"
                raise InvalidRequest(
                    f"no MCP server labelled '{label}' on this server; configured: {have}",
                    param=f"{where}.server_label",
                )
            item = known.get(label)
            if item is None:
                try:
                    found = await hub.list_tools(label)
                except Exception as exc:
                    raise McpUnavailable(label, str(exc) or type(exc).__name__) from None
                item = it.mcp_list_tools(label, found)
                tools.listed.append(item)
                known[label] = item
            for t in item["tools"]:
                if allowed is not None and t["name"] not in allowed:
                    continue
                name = it.chat_name(t["name"])
                schema = {k: v for k, v in (t.get("input_schema") or {}).items() if k != "$schema"}
                offer(name, t.get("description"), schema or None, where)
                tools.mcp[name] = (label, t["name"])
        else:
            raise InvalidRequest(
                f"'{where}.type' {kind!r} is not supported: {HOSTED_TOOLS}",
                param=f"{where}.type",
                code="unsupported_parameter",
            )
    tools.choice = _choice(req.tool_choice, names)
    return tools


def _choice(given: str | dict | None, names: set[str]) -> str | dict:
    """The request's tool_choice as chat's, checked against the tools offered."""
    choice = tool_choice(given)
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if isinstance(given, dict) and given.get("type") == "mcp":
            name = it.chat_name(name)
            choice = {"type": "function", "function": {"name": name}}
        if name not in names:
            known = ", ".join(sorted(names)) or "none"
            raise InvalidRequest(
                f"tool_choice names the tool '{name}', which is not among the tools ({known})", "tool_choice"
            )
    elif choice == "required" and not names:
        raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")
    return choice
