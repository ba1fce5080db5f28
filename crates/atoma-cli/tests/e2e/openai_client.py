"""End-to-end client: the official `openai` package against an Atoma node.

Signs every request in an httpx request hook exactly as the protocol asks (X-Signature = Sui
ed25519 signature, base64(0x00 || sig || pubkey), over Blake2b-256 of the body; X-Stack-Small-Id),
then checks a plain and a streamed chat completion, the node's signature on the response (and on
every chunk), the wider OpenAI surface (sampling extensions, logit_bias, log-probabilities plain
and streamed, token-id prompts, echo, cached tokens, system_fingerprint, /tokenize and
/detokenize, unsupported parameters refused by name), and that a stack the key does not own is
refused with 401, even with a 3.5 MB body.

usage: openai_client.py URL KEYSTORE STACK MODEL
"""
import base64
import hashlib
import json
import os
import sys
import time

import openai

from atoma_signing import Signer, httpx, verify

url, keystore, stack, model = sys.argv[1:5]
signer = Signer(keystore, stack)
key, pub = signer.key, signer.pub


client = openai.OpenAI(base_url=url + "/v1", api_key="not-used", http_client=signer.http_client())
messages = [{"role": "user", "content": "Say something."}]

raw_resp = client.chat.completions.with_raw_response.create(
    model=model, messages=messages, max_tokens=8, extra_body={"nonce": os.urandom(8).hex()})
completion = raw_resp.parse()
assert completion.choices[0].message.role == "assistant"
assert completion.usage.completion_tokens >= 1
node_key = verify(raw_resp.http_response.json())
print("plain:", repr(completion.choices[0].message.content), completion.usage)

stream = client.chat.completions.with_raw_response.create(
    model=model, messages=messages, max_tokens=8, stream=True,
    stream_options={"include_usage": True}, extra_body={"nonce": os.urandom(8).hex()})
text, usage, signed_chunks = "", None, 0
for line in stream.http_response.iter_lines():
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    chunk = json.loads(line[len("data: "):])
    assert verify(chunk) == node_key, "chunk signed by another key"
    signed_chunks += 1
    for choice in chunk.get("choices", []):
        text += choice.get("delta", {}).get("content") or ""
    usage = chunk.get("usage") or usage
assert usage and usage["completion_tokens"] >= 1, usage
print("stream:", repr(text), usage, f"{signed_chunks} signed chunks")

# Parsed streaming through the SDK's own iterator works too.
for event in client.chat.completions.create(model=model, messages=messages, max_tokens=4, stream=True,
                                            extra_body={"nonce": os.urandom(8).hex()}):
    pass

# --- The wider OpenAI surface ---------------------------------------------------------
def nonce():
    return {"nonce": os.urandom(8).hex()}


# Sampling extensions (vLLM's names) and a seed: the same request twice gives the same text.
ext = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2}
a = client.chat.completions.create(model=model, messages=messages, max_tokens=12, seed=7,
                                   temperature=0.9, extra_body={**ext, **nonce()})
b = client.chat.completions.create(model=model, messages=messages, max_tokens=12, seed=7,
                                   temperature=0.9, extra_body={**ext, **nonce()})
assert a.choices[0].message.content == b.choices[0].message.content
assert a.system_fingerprint and "model-sha256:" in a.system_fingerprint, a.system_fingerprint
print("seeded with top_k/min_p/repetition_penalty:", repr(a.choices[0].message.content))

# Tokenizer routes (llama-server's shapes).
http = httpx.Client()
toks = http.post(url + "/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
assert toks and all("id" in t and "piece" in t for t in toks), toks
ids = [t["id"] for t in toks]
back = http.post(url + "/detokenize", json={"tokens": ids}).json()
# (SentencePiece tokenizers, like the tiny test model's, add a leading space.)
assert back.get("content", "").lstrip() == "Hello world", (toks, back)

# logit_bias: +100 on one token makes greedy decoding repeat it.
forced = ids[0]
c = client.completions.create(model=model, prompt="x", max_tokens=5, temperature=0,
                              logit_bias={str(forced): 100}, extra_body=nonce())
expect = http.post(url + "/detokenize", json={"tokens": [forced] * 5}).json()["content"]
assert c.choices[0].text == expect, (c.choices[0].text, expect)

# Chat log-probabilities, plain and streamed, agree with each other and with the text.
lp_args = dict(model=model, messages=messages, max_tokens=8, seed=3, temperature=0.8,
               logprobs=True, top_logprobs=3)
raw_lp = client.chat.completions.with_raw_response.create(**lp_args, extra_body=nonce())
# The signed body re-serializes to the hashed bytes in Python too (floats included).
assert verify(raw_lp.http_response.json()) == node_key
plain = raw_lp.parse()
content = plain.choices[0].logprobs.content
assert len(content) == plain.usage.completion_tokens
for e in content:
    assert e.logprob <= 0 and len(e.top_logprobs) == 3
    try:
        assert bytes(e.bytes).decode() == e.token
    except UnicodeDecodeError:  # a piece of a character: OpenAI's "bytes:\xNN" form
        assert e.token == "bytes:" + "".join(f"\\x{b:02x}" for b in e.bytes), (e.token, e.bytes)
    assert e.top_logprobs[0].logprob >= e.logprob - 1e-6
streamed = []
raw_stream = client.chat.completions.with_raw_response.create(**lp_args, stream=True, extra_body=nonce())
for line in raw_stream.http_response.iter_lines():
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    chunk = json.loads(line[len("data: "):])
    assert verify(chunk) == node_key
    for ch in chunk["choices"]:
        streamed.extend((ch.get("logprobs") or {}).get("content") or [])
assert [(e["token"], e["logprob"]) for e in streamed] == [(e.token, e.logprob) for e in content]
print("logprobs:", [(e.token, round(e.logprob, 3)) for e in content[:3]], "...")

# Completions: token-id prompt with echo; logprobs in the legacy shape.
c = client.completions.create(model=model, prompt=ids, max_tokens=4, echo=True, seed=1, extra_body=nonce())
assert c.choices[0].text.startswith(back["content"]), c.choices[0].text
c = client.completions.create(model=model, prompt="Once upon", max_tokens=4, logprobs=2, seed=1,
                              extra_body=nonce())
assert len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
assert all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)

# The prefix cache shows in usage: a long prompt twice.
long = [{"role": "user", "content": "Tell me a story about " + "a red fox and a brown dog " * 3}]
first = client.chat.completions.create(model=model, messages=long, max_tokens=2, extra_body=nonce())
second = client.chat.completions.create(model=model, messages=long, max_tokens=2, extra_body=nonce())
cached = second.usage.prompt_tokens_details.cached_tokens
assert cached and cached > 0 and cached < second.usage.prompt_tokens, second.usage
print("cached tokens on a repeated prompt:", cached, "of", second.usage.prompt_tokens)

# Structured outputs: JSON mode and a JSON schema, plain and streamed, parse and validate.
schema = {"type": "object", "additionalProperties": False, "required": ["color", "n"],
          "properties": {"color": {"enum": ["red", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
rf = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}}
c = client.chat.completions.create(model=model, messages=messages, max_tokens=60, seed=2,
                                   response_format=rf, extra_body=nonce())
assert c.choices[0].finish_reason == "stop", c
v = json.loads(c.choices[0].message.content)
assert v["color"] in ("red", "blue") and 0 <= v["n"] <= 9 and len(v) == 2, v
text = ""
for ev in client.chat.completions.create(model=model, messages=messages, max_tokens=60, seed=2,
                                         response_format=rf, stream=True, extra_body=nonce()):
    for ch in ev.choices:
        text += ch.delta.content or ""
assert text == c.choices[0].message.content, (text, c.choices[0].message.content)
c = client.chat.completions.create(model=model, messages=messages, max_tokens=120, seed=4,
                                   response_format={"type": "json_object"}, extra_body=nonce())
if c.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(c.choices[0].message.content), dict)
print("structured output:", c.choices[0].message.content[:60], "| schema:", v)
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=4, extra_body=nonce(),
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "bad", "schema": {"type": "no-such-type"}}})
    raise SystemExit("a bad schema must be refused")
except openai.BadRequestError as e:
    assert "grammar" in str(e), str(e)

# Tools: calls generated under a grammar name a declared function with valid arguments,
# plain and streamed, then a multi-turn conversation with the tool's result.
import jsonschema

weather_params = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                  "properties": {"city": {"type": "string", "maxLength": 20},
                                 "unit": {"enum": ["celsius", "fahrenheit"]}}}
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": weather_params}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
             "required": ["zone"], "additionalProperties": False}}}]
params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
ask = [{"role": "user", "content": "What's the weather in Oslo?"}]
raw_tc = client.chat.completions.with_raw_response.create(
    model=model, messages=ask, tools=tools, tool_choice="required", max_tokens=120, seed=5,
    extra_body=nonce())
assert verify(raw_tc.http_response.json()) == node_key
tc = raw_tc.parse()
calls = tc.choices[0].message.tool_calls
if tc.choices[0].finish_reason == "tool_calls":
    assert calls and tc.choices[0].message.content is None, tc
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
else:  # the tiny model may run out of tokens inside a call; then it is text, not a call
    assert tc.choices[0].finish_reason == "length" and not calls, tc
named = client.chat.completions.create(
    model=model, messages=ask, tools=tools, max_tokens=120, seed=6, parallel_tool_calls=False,
    tool_choice={"type": "function", "function": {"name": "get_time"}}, extra_body=nonce())
if named.choices[0].finish_reason == "tool_calls":
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"], named
# Streamed, the same seed gives the same calls, as `delta.tool_calls`.
streamed_calls, finish = {}, None
for ev in client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required",
                                         max_tokens=120, seed=5, stream=True, extra_body=nonce()):
    for ch in ev.choices:
        for d in ch.delta.tool_calls or []:
            entry = streamed_calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
assert finish == tc.choices[0].finish_reason, (finish, tc)
assert [(c["name"], c["arguments"]) for _, c in sorted(streamed_calls.items())] == \
    [(c.function.name, c.function.arguments) for c in calls or []], (streamed_calls, calls)
assert all(c["id"].startswith("call_") for c in streamed_calls.values()), streamed_calls
# Multi-turn: the assistant's calls (content null) and the tool's answer go back in.
history = ask + [{"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": -3}'}]
follow = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=16,
                                        seed=1, extra_body=nonce())
assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls"), follow
try:
    client.chat.completions.create(model=model, messages=ask, tools=tools, max_tokens=4,
                                   tool_choice={"type": "function", "function": {"name": "nope"}},
                                   extra_body=nonce())
    raise SystemExit("a tool_choice naming an undeclared function must be refused")
except openai.BadRequestError as e:
    assert "nope" in str(e), str(e)
print("tools:", tc.choices[0].finish_reason, [(c.function.name, c.function.arguments) for c in calls or []])

# n choices: choice i is what the same request with seed + i gives alone; streamed the same.
raw_n = client.chat.completions.with_raw_response.create(
    model=model, messages=messages, max_tokens=6, seed=20, temperature=0.9, n=3, extra_body=nonce())
assert verify(raw_n.http_response.json()) == node_key
multi = raw_n.parse()
assert [c.index for c in multi.choices] == [0, 1, 2], multi
for i in range(3):
    single = client.chat.completions.create(model=model, messages=messages, max_tokens=6,
                                            seed=20 + i, temperature=0.9, extra_body=nonce())
    assert single.choices[0].message.content == multi.choices[i].message.content, (i, single, multi)
texts = {}
for ev in client.chat.completions.create(model=model, messages=messages, max_tokens=6, seed=20,
                                         temperature=0.9, n=3, stream=True, extra_body=nonce()):
    for ch in ev.choices:
        texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
assert [texts[i] for i in range(3)] == [c.message.content for c in multi.choices], texts
c = client.completions.create(model=model, prompt="Once upon", max_tokens=4, n=2, echo=True, seed=3,
                              extra_body=nonce())
assert len(c.choices) == 2 and all(ch.text.startswith("Once upon") for ch in c.choices), c
# A list of prompts, n choices each: choice p*n + j is prompt p's j-th (seed + p*n + j).
lst = client.completions.create(model=model, prompt=["Once upon", "The sky"], max_tokens=4, n=2,
                                seed=11, extra_body=nonce())
assert [c.index for c in lst.choices] == [0, 1, 2, 3], lst
alone = client.completions.create(model=model, prompt="The sky", max_tokens=4, seed=13,
                                  extra_body=nonce())
assert lst.choices[2].text == alone.choices[0].text, (lst, alone)
print("n=3:", [ch.message.content for ch in multi.choices], multi.usage.completion_tokens, "tokens")

# Parameters we do not implement are refused by name, never ignored.
for extra, name in [({"response_format": {"type": "regex"}}, "response_format"),
                    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
                    ({"n": 9}, "`n`"),
                    ({"modalities": ["text", "audio"]}, "modalities")]:
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, **extra, extra_body=nonce())
        raise SystemExit(f"{name} must be refused")
    except openai.BadRequestError as e:
        assert name in str(e), str(e)
print("unsupported parameters refused by name")

signer.stack = "999"
# A 3.5 MB body signed by a key that owns no such stack: 401 before any work.
big = {"model": model, "messages": [{"role": "user", "content": "word " * 700_000}], "max_tokens": 4}
body_bytes = json.dumps(big).encode()
digest = hashlib.blake2b(body_bytes, digest_size=32).digest()
headers = {"X-Signature": base64.b64encode(b"\x00" + key.sign(digest) + pub).decode(),
           "X-Stack-Small-Id": "999", "Content-Type": "application/json"}
plain_http = httpx.Client()
times = []
for _ in range(5):
    t0 = time.perf_counter()
    r = plain_http.post(url + "/v1/chat/completions", content=body_bytes, headers=headers)
    times.append((time.perf_counter() - t0) * 1000)
    assert r.status_code == 401, r.text
print(f"3.5 MB body on a stack the key does not own: 401 in {min(times):.1f} ms best, "
      f"{sorted(times)[2]:.1f} ms median of 5 (round trip on loopback, body pre-signed)")
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                   extra_body={"nonce": os.urandom(8).hex()})
    raise SystemExit("a stack this key does not hold must be refused")
except openai.AuthenticationError as e:
    print("refused as expected:", e.status_code)
print("openai e2e ok")
