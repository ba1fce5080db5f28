"""Structured outputs on the default model, through the official `openai` SDK: 100 generations
over five JSON schemas (nested objects, arrays, enums, required fields, integers, numbers,
booleans), each parsed and validated against its schema with `jsonschema`; then tool calls
(`tool_choice` required, auto and named): every call must name a declared function and its
arguments validate against that function's schema. Every answer's signature is checked too.

usage: structured_outputs.py URL KEYSTORE STACK MODEL [N]
"""
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

from atoma_signing import Signer, verify

url, keystore, stack, model = sys.argv[1:5]
total = int(sys.argv[5]) if len(sys.argv) > 5 else 100
client = openai.OpenAI(base_url=url + "/v1", api_key="not-used",
                       http_client=Signer(keystore, stack).http_client())

S = {"type": "string", "maxLength": 40}
SCHEMAS = {
    "person": ({
        "type": "object", "additionalProperties": False,
        "required": ["name", "age", "address"],
        "properties": {
            "name": S,
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {"type": "object", "additionalProperties": False,
                        "required": ["city", "country"],
                        "properties": {"city": S, "country": S}},
        }}, "Invent a person who lives in {topic} and describe them as JSON."),
    "shopping": ({
        "type": "object", "additionalProperties": False, "required": ["items"],
        "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "quantity"],
            "properties": {"name": S, "quantity": {"type": "integer", "minimum": 1, "maximum": 20}}}}},
    }, "Write a short shopping list for {topic} as JSON."),
    "weather": ({
        "type": "object", "additionalProperties": False,
        "required": ["city", "condition", "temperature_c", "windy"],
        "properties": {
            "city": S,
            "condition": {"enum": ["sunny", "cloudy", "rain", "snow", "fog"]},
            "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60},
            "windy": {"type": "boolean"},
        }}, "Give a weather report for a city in {topic} as JSON."),
    "book": ({
        "type": "object", "additionalProperties": False,
        "required": ["title", "author", "year", "genres", "rating"],
        "properties": {
            "title": S, "author": S,
            "year": {"type": "integer", "minimum": 1450, "maximum": 2026},
            "genres": {"type": "array", "maxItems": 3,
                       "items": {"enum": ["fiction", "history", "science", "poetry", "travel"]}},
            "rating": {"type": "number", "minimum": 0, "maximum": 5},
        }}, "Recommend a book about {topic} as JSON."),
    "task": ({
        "type": "object", "additionalProperties": False,
        "required": ["id", "status", "priority", "subtasks"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "status": {"enum": ["todo", "doing", "done"]},
            "priority": {"enum": ["low", "medium", "high"]},
            "subtasks": {"type": "array", "maxItems": 3, "items": {
                "type": "object", "additionalProperties": False, "required": ["title", "done"],
                "properties": {"title": S, "done": {"type": "boolean"}}}},
            "note": S,
        }}, "Plan a task about {topic} as JSON."),
}
TOPICS = ["France", "Japan", "a winter holiday", "a birthday party", "Brazil", "Kenya",
          "gardening", "the sea", "cooking pasta", "Canada", "space travel", "a camping trip",
          "Norway", "music", "India", "a school day", "Peru", "painting", "Egypt", "chess"]


def one(i: int):
    name = list(SCHEMAS)[i % len(SCHEMAS)]
    schema, prompt = SCHEMAS[name]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt.format(topic=TOPICS[i % len(TOPICS)])}],
        max_tokens=300, temperature=0.7, seed=i,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
        extra_body={"nonce": f"so-{i}-{time.time_ns()}"})
    verify(raw.http_response.json())
    c = raw.parse()
    text = c.choices[0].message.content
    try:
        value = json.loads(text)
        jsonschema.validate(value, schema)
        return name, True, c.usage.completion_tokens, c.choices[0].finish_reason, text
    except (json.JSONDecodeError, jsonschema.ValidationError) as e:
        return name, False, c.usage.completion_tokens, c.choices[0].finish_reason, f"{text!r}: {e}"


t0 = time.perf_counter()
with ThreadPoolExecutor(8) as pool:
    results = list(pool.map(one, range(total)))
elapsed = time.perf_counter() - t0
bad = [r for r in results if not r[1]]
tokens = sum(r[2] for r in results)
for name in SCHEMAS:
    mine = [r for r in results if r[0] == name]
    ok = sum(r[1] for r in mine)
    print(f"{name:9} {ok}/{len(mine)} valid, example: {mine[0][4][:100]}")
print(f"{total - len(bad)}/{total} answers parse and validate against their schema; "
      f"{tokens} tokens in {elapsed:.1f} s ({tokens / elapsed:.0f} tokens/s at concurrency 8)")
for r in bad:
    print("INVALID", r[0], r[3], r[4])
assert not bad, f"{len(bad)} invalid answers"

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                       "properties": {"city": S, "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "additionalProperties": False,
                       "required": ["amount", "from", "to"],
                       "properties": {"amount": {"type": "number", "minimum": 0},
                                      "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                      "to": {"type": "string", "pattern": "^[A-Z]{3}$"}}}}},
    {"type": "function", "function": {
        "name": "set_alarm", "description": "Set an alarm",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["hour", "minute"],
                       "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                      "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                                      "label": S}}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASKS = ["What's the weather in Paris?", "How much is 120 euros in US dollars?",
        "Wake me up at 7:30 tomorrow.", "Is it raining in Tokyo right now?",
        "Convert 15 GBP to JPY.", "Set an alarm for 6 pm called gym."]
CHOICES = ["required", "auto", {"type": "function", "function": {"name": "get_weather"}}]


def call(i: int):
    choice = CHOICES[i % len(CHOICES)]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": ASKS[i % len(ASKS)]}], tools=TOOLS,
        tool_choice=choice, max_tokens=200, temperature=0.7, seed=1000 + i,
        extra_body={"nonce": f"tc-{i}-{time.time_ns()}"})
    verify(raw.http_response.json())
    c = raw.parse().choices[0]
    problems = []
    for tc in c.message.tool_calls or []:
        if tc.function.name not in PARAMS:
            problems.append(f"undeclared function {tc.function.name}")
            continue
        try:
            jsonschema.validate(json.loads(tc.function.arguments), PARAMS[tc.function.name])
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            problems.append(f"{tc.function.name}({tc.function.arguments}): {e}")
    if choice != "auto" and c.finish_reason != "tool_calls":
        problems.append(f"no call under tool_choice={choice}: {c.finish_reason} {c.message.content!r}")
    if isinstance(choice, dict) and any(tc.function.name != "get_weather" for tc in c.message.tool_calls or []):
        problems.append("the named function was not the one called")
    return choice, c.finish_reason, [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []], problems


t0 = time.perf_counter()
with ThreadPoolExecutor(8) as pool:
    calls = list(pool.map(call, range(30)))
n_calls = sum(len(r[2]) for r in calls)
auto_called = sum(1 for r in calls if r[0] == "auto" and r[2])
print(f"tool calls: {n_calls} calls in 30 answers ({time.perf_counter() - t0:.1f} s), all naming a "
      f"declared function with valid arguments: {not any(r[3] for r in calls)}; under auto, "
      f"{auto_called}/10 answers called a tool")
for r in calls[:3]:
    print("  example:", r[0], r[1], r[2])
for r in calls:
    for p in r[3]:
        print("INVALID CALL", p)
assert not any(r[3] for r in calls)
print("structured outputs ok")
