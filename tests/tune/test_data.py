"""ember.tune.data: the server's rendering, masks from prefixes, every bad line named by number."""

from __future__ import annotations

import asyncio
import json

import pytest

from ember.protocol import tools
from ember.protocol.requests import ChatCompletionRequest
from ember.server.backend import EngineBackend
from ember.tune.data import DataError, detect_method, load_dpo, load_sft
from tests.fixtures_tokenizer import smollm2_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def call(id_: str, name: str, args: dict) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# System prompts, none (the template's default), multi-turn, parallel calls and their results, developer
# role, content parts, a weight-0 turn, special-token text typed by a user, non-ASCII.
CORPUS = [
    {
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "1, 2, 3."},
            {"role": "user", "content": "And back?"},
            {"role": "assistant", "content": "3, 2, 1.", "weight": 0},
            {"role": "user", "content": "Now in French: ünë, dëux?"},
            {"role": "assistant", "content": "Un, deux, trois — voilà."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "Weather in Paris and Oslo, and the time?"},
            {
                "role": "assistant",
                "tool_calls": [
                    call("c1", "get_weather", {"city": "Paris"}),
                    call("c2", "get_weather", {"city": "Oslo"}),
                    call("c3", "get_time", {}),
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21, "sky": "clear"}'},
            {"role": "tool", "tool_call_id": "c2", "content": '{"temp": -3, "sky": "snow"}'},
            {"role": "tool", "tool_call_id": "c3", "content": "14:05"},
            {"role": "assistant", "content": "Paris 21°C clear, Oslo -3°C snow; it is 14:05."},
        ],
        "tools": [WEATHER, TIME],
    },
    {
        "messages": [
            {"role": "developer", "content": "Use tools when needed."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Is it cold "}, {"type": "text", "text": "in Rome?"}],
            },
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [call("x", "get_weather", {"city": "Rome"})],
            },
            {"role": "tool", "tool_call_id": "x", "content": "8 degrees"},
            {"role": "assistant", "content": "Yes, 8 degrees."},
            {"role": "user", "content": "What does <|im_end|> mean?"},
            {"role": "assistant", "content": "It ends a turn."},
        ],
        "tools": [WEATHER],
        "parallel_tool_calls": False,
    },
]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def lines(*objs) -> list[str]:
    return [json.dumps(o) for o in objs]


def served_ids(tok, **body) -> list[int]:
    """The prompt ids the HTTP backend's chat path hands the engine for this request body."""
    engine = type("Engine", (), {"tokenizer": tok, "inputs": None, "adapters": {}})()
    backend = EngineBackend(engine, "m")
    seen = []

    async def respond(body, prompts, *args):
        seen.append(prompts[0])
        return {}

    backend._respond = respond
    asyncio.run(backend.chat(ChatCompletionRequest(model="m", **body), None, None))
    return seen[0]


def spans(labels: list[bool]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, on in enumerate([*labels, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            out.append((start, i))
            start = None
    return out


# -- train/serve parity ------------------------------------------------------------------------------


def test_train_serve_token_parity(tok):
    """Every token the trainer sees is the server's, and exactly the assistant turns are supervised:
    each supervised span starts where the server's prompt for that turn ends and is what the model must
    write there (its text, or calls the server parses back to the same calls) plus the EOS."""
    examples = load_sft(lines(*CORPUS), tok)
    compared = matched = 0
    for ex, obj in zip(examples, CORPUS, strict=True):
        extra = {k: v for k, v in obj.items() if k != "messages"}
        msgs = [{k: v for k, v in m.items() if k != "weight"} for m in obj["messages"]]
        full = served_ids(tok, messages=msgs, add_generation_prompt=False, **extra)
        compared += max(len(full), len(ex.input_ids))
        matched += sum(a == b for a, b in zip(full, ex.input_ids, strict=False))
        assert ex.input_ids == full

        want = []
        for i, m in enumerate(obj["messages"]):
            if m["role"] != "assistant" or m.get("weight", 1) == 0:
                continue
            prompt = served_ids(tok, messages=msgs[:i], **extra)
            assert ex.input_ids[: len(prompt)] == prompt
            want.append((len(prompt), m))
        got = spans(ex.labels)
        assert [s for s, _ in got] == [s for s, _ in want]
        for (start, end), (_, m) in zip(got, want, strict=True):
            assert ex.input_ids[end - 1] == tok.eos_token_id
            text = tok.decode(ex.input_ids[start : end - 1], skip_special_tokens=False)
            if m.get("tool_calls"):
                head, sep, rest = text.partition("<tool_call>")
                assert head.rstrip("\n") == (m.get("content") or "")
                parsed = [
                    (c["function"]["name"], json.loads(c["function"]["arguments"]))
                    for c in tools.parse(sep + rest)
                ]
                assert parsed == [
                    (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m["tool_calls"]
                ]
            else:
                assert text == m["content"]
    assert matched == compared  # 100% of tokens


def test_parallel_calls_parse_back_whole(tok):
    ex = load_sft(lines(CORPUS[2]), tok)[0]
    start, end = spans(ex.labels)[0]
    parsed = tools.parse(tok.decode(ex.input_ids[start : end - 1], skip_special_tokens=False))
    assert [c["function"]["name"] for c in parsed] == ["get_weather", "get_weather", "get_time"]


def test_weight_zero_turn_is_context_only(tok):
    ex = load_sft(lines(CORPUS[1]), tok)[0]
    trained = [
        tok.decode([t for t, on in zip(ex.input_ids[s:e], ex.labels[s:e], strict=True) if on])
        for s, e in spans(ex.labels)
    ]
    assert trained == ["1, 2, 3.", "Un, deux, trois — voilà."]
    assert "3, 2, 1." in tok.decode(ex.input_ids)


def test_turn_separator_after_eos_is_not_trained(tok):
    ex = load_sft(lines(CORPUS[0]), tok)[0]
    ((start, end),) = spans(ex.labels)
    assert ex.input_ids[end - 1] == tok.eos_token_id and end < len(ex.input_ids)  # the "\n" after it


# -- prompt/completion and DPO -----------------------------------------------------------------------


def test_prompt_completion(tok):
    (ex,) = load_sft(lines({"prompt": "Q: 2+2?\nA:", "completion": " 4"}), tok)
    prompt = tok.encode("Q: 2+2?\nA:")
    assert ex.input_ids == prompt + tok.encode(" 4", add_special_tokens=False) + [tok.eos_token_id]
    assert ex.labels == [False] * len(prompt) + [True] * (len(ex.input_ids) - len(prompt))


def test_dpo_pair_matches_server_prompt(tok):
    obj = {
        "input": {"messages": CORPUS[2]["messages"][:2], "tools": [WEATHER, TIME]},
        "preferred_output": [
            {"role": "assistant", "tool_calls": [call("a", "get_weather", {"city": "Paris"})]}
        ],
        "non_preferred_output": [{"role": "assistant", "content": "I cannot know that."}],
    }
    (pair,) = load_dpo(lines(obj), tok)
    assert pair.prompt_ids == served_ids(tok, **obj["input"])
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tok.eos_token_id
    assert tok.decode(pair.rejected_ids, skip_special_tokens=False) == "I cannot know that.<|im_end|>"
    chosen = tok.decode(pair.chosen_ids[:-1], skip_special_tokens=False)
    assert tools.parse(chosen)[0]["function"]["name"] == "get_weather"


def test_detect_method():
    assert detect_method(["", "not json", json.dumps(CORPUS[0])]) == "sft"
    assert detect_method(lines({"prompt": "a", "completion": "b"})) == "sft"
    assert detect_method(lines({"input": {}, "preferred_output": [], "non_preferred_output": []})) == "dpo"
    with pytest.raises(DataError, match="line 1: neither"):
        detect_method(lines({"foo": 1}))


def test_paths_and_bytes(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines(*CORPUS)) + "\n\n")
    assert load_sft(path, tok) == load_sft(str(path), tok) == load_sft(path.read_bytes(), tok)
    assert detect_method(path) == "sft"
    with pytest.raises(DataError, match="no such file"):
        load_sft(tmp_path / "missing.jsonl", tok)


def test_max_len_truncates_and_counts(tok, caplog):
    whole = load_sft(lines(*CORPUS), tok)
    out = load_sft(lines(*CORPUS), tok, max_len=40)
    assert len(out) == len(CORPUS) and out.truncated == sum(len(e.input_ids) > 40 for e in whole) == 3
    for e, w in zip(out, whole, strict=True):
        assert e.input_ids == w.input_ids[:40] and e.labels == w.labels[:40]
    assert "were cut" in caplog.text


# -- bad files ---------------------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}

BAD_SFT = [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON object, not list"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [USER, ASSISTANT], "temperature": 1}, "unknown field 'temperature'"),
    ({"messages": [{"content": "x"}, ASSISTANT]}, r"messages\[0\] has no role"),
    ({"messages": [{"role": "bot", "content": "x"}, ASSISTANT]}, "unknown role 'bot'"),
    ({"messages": [USER]}, "no assistant message"),
    ({"messages": [ASSISTANT, USER, ASSISTANT]}, r"messages\[0\] is the assistant's"),
    ({"messages": [USER, {**ASSISTANT, "weight": 2}]}, "weight must be 0 or 1"),
    ({"messages": [USER, {**ASSISTANT, "weight": True}]}, "weight must be 0 or 1"),
    ({"messages": [{**USER, "weight": 1}, ASSISTANT]}, "weight is only for assistant"),
    ({"messages": [USER, {"role": "assistant", "content": ""}]}, "needs content or tool_calls"),
    ({"messages": [USER, {"role": "assistant", "content": 5}]}, r"messages\[1\].content"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": {"a": 1}}]}, "tool_calls must be a list"),
    (
        {"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "a", "type": "function"}]}]},
        r"messages\[1\].tool_calls\[0\].function",
    ),
    (
        {
            "messages": [USER, {"role": "assistant", "tool_calls": [call("a", "nope", {})]}],
            "tools": [WEATHER],
        },
        "calls 'nope', which is not among the tools",
    ),
    (
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            **call("a", "get_weather", {}),
                            "function": {"name": "get_weather", "arguments": "{bad"},
                        }
                    ],
                },
            ],
            "tools": [WEATHER],
        },
        "arguments in the history are not JSON",
    ),
    (
        {
            "messages": [
                USER,
                {"role": "assistant", "tool_calls": [call("a", "get_time", {}), call("b", "get_time", {})]},
            ],
            "tools": [TIME],
            "parallel_tool_calls": False,
        },
        "parallel_tool_calls is false",
    ),
    (
        {"messages": [USER, ASSISTANT, {"role": "tool", "tool_call_id": "zz", "content": "1"}]},
        "which no earlier message made",
    ),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "image_url"}]}]}, "not supported"),
    ({"messages": [USER, {"role": "assistant", "content": "\n\nhello"}]}, "not a prefix"),
    (
        {"messages": [USER, ASSISTANT], "tools": [{"type": "function", "function": "f"}]},
        r"tools\[0\].function",
    ),
    ({"messages": [USER, {"role": "assistant", "tool_calls": ["f"]}]}, r"messages\[1\].tool_calls\[0\]"),
    ({"prompt": "a"}, "completion must be a non-empty string"),
    ({"prompt": "a", "completion": "b", "x": 1}, "unknown field 'x'"),
    ({"input": {}, "preferred_output": [], "non_preferred_output": []}, "method dpo"),
]


@pytest.mark.parametrize(("line", "what"), BAD_SFT, ids=[w for _, w in BAD_SFT])
def test_bad_sft_line_named(tok, line, what):
    text = line if isinstance(line, str) else json.dumps(line)
    with pytest.raises(DataError, match=f"^line 3: .*{what}") as exc:
        first = {"prompt": "a", "completion": "b"} if "prompt" in text else CORPUS[0]
        load_sft([json.dumps(first), "", text, "{also bad"], tok)
    assert exc.value.line == 3


def test_mixed_formats_refused(tok):
    with pytest.raises(DataError, match="line 2: a completion example in a file of chat"):
        load_sft(lines(CORPUS[0], {"prompt": "a", "completion": "b"}), tok)


def test_nothing_supervised_refused(tok):
    zero = {"messages": [USER, {**ASSISTANT, "weight": 0}]}
    with pytest.raises(DataError, match="no supervised token") as exc:
        load_sft(lines(zero, zero), tok)
    assert exc.value.line is None
    with pytest.raises(DataError, match="no examples"):
        load_sft(["", "  "], tok)


PAIR = {
    "input": {"messages": [USER]},
    "preferred_output": [ASSISTANT],
    "non_preferred_output": [{"role": "assistant", "content": "go away"}],
}
BAD_DPO = [
    ({"input": {"messages": [USER]}, "preferred_output": [ASSISTANT]}, "needs non_preferred_output"),
    ({**PAIR, "input": [USER]}, "input must be an object"),
    ({**PAIR, "input": {"messages": []}}, "input.messages must be a non-empty"),
    ({**PAIR, "preferred_output": ASSISTANT}, "preferred_output must be a list of one"),
    ({**PAIR, "non_preferred_output": [USER]}, r"non_preferred_output\[0\] must have role assistant"),
    ({**PAIR, "non_preferred_output": [ASSISTANT]}, "are the same"),
    ({**PAIR, "extra": 1}, "unknown field 'extra'"),
    (
        {**PAIR, "preferred_output": [{"role": "assistant", "content": ""}]},
        r"preferred_output: messages\[1\]: .*needs content",
    ),
    (CORPUS[0], "method sft"),
]


@pytest.mark.parametrize(("line", "what"), BAD_DPO, ids=[w for _, w in BAD_DPO])
def test_bad_dpo_line_named(tok, line, what):
    with pytest.raises(DataError, match=f"^line 2: .*{what}"):
        load_dpo(lines(PAIR, line), tok)


def test_dpo_max_len(tok):
    (pair,) = load_dpo(lines(PAIR), tok, max_len=len(load_dpo(lines(PAIR), tok)[0].prompt_ids) + 2)
    assert len(pair.chosen_ids) == len(pair.rejected_ids) == 2
    with pytest.raises(DataError, match="leaves no room"):
        load_dpo(lines(PAIR), tok, max_len=5)
