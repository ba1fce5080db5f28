#!/usr/bin/env python3
"""Records llama.cpp's behaviour on the real models as test fixtures.

For each model it starts llama.cpp's llama-server on 127.0.0.1, then records
  * the token ids llama.cpp gives for >100 test strings (mixed scripts, emoji, code,
    whitespace runs, control characters, special tokens), with BOS as the model adds it;
  * the first 32 greedy tokens for 10 prompts, given as token ids (so both engines see the
    same input).
The fixtures are written to crates/atoma-engine/tests/fixtures/llama-cpp-<name>.json and read by
crates/atoma-engine/tests/real_models.rs. Run it again only when a model changes.

usage: tools/record-llama-goldens.py [--server PATH] [--cache DIR]
"""
import argparse, hashlib, json, os, random, subprocess, sys, time, urllib.request

MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", True),
    "gemma3": ("gemma-3-270m-q4_k_m.gguf", False),
}

HAND = [
    "Hello world", " Hello world", "Hello  world", "  leading and trailing  ", "",
    "The quick brown fox jumps over the lazy dog.", "1234567890", "3.14159 + 2.71828 = 5.85987",
    "I'm, you're, they've, we'll, she'd, it's", "HELLO, World! How ARE you?",
    "naïve café résumé façade", "Straße über Größe", "Привет, как дела?", "Γειά σου Κόσμε",
    "你好，世界！今天天气很好。", "こんにちは世界、カタカナとひらがな", "안녕하세요 세계",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "🙂🙃😀😃😄 emoji 🚀🔥👍🏽 family 👨‍👩‍👧‍👦", "flags 🇫🇷🇯🇵 and ✓ ✗ ★ ☃",
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n",
    "def f(x):\n\treturn x ** 2  # square\n",
    "<div class=\"a\"><p>Hi &amp; bye</p></div>", "SELECT * FROM users WHERE id = 42;",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}", "https://example.com/path?q=1&r=two#frag",
    "a\nb\n\nc\n\n\nd", "tabs\t\tand\t\t\ttabs", "spaces:     five, then      six",
    "\n\n\n\n", "\t", " ", "   ", "line one\r\nline two\r\n", "null\x00byte", "bell\x07 and esc\x1b[0m",
    "control \x01\x02\x03 chars", "mixed\u00a0nbsp\u2009thin\u200bzero-width",
    "a" * 40, "ab" * 25, "!!!???...,,,;;;", "$100.00 (USD) – 50% off — “quoted” ‘single’",
    "e = mc² ∑ ∫ √ ∞ ≠ ≤ ≥ ± × ÷", "The year 2024 had 366 days; 1/3 ≈ 0.333",
    "CamelCaseIdentifier snake_case_identifier kebab-case-identifier",
    "user@example.com, +1 (555) 123-4567", "¿Qué? ¡Sí! Ça va. Ñandú",
]

SPECIAL = {
    "smollm2": [
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "text <|im_end|> more", "<|endoftext|>", "<|im_start|><|im_end|>", "<|im_start|> spaced <|im_end|>",
        "<repo_name>x<file_sep>y", "almost special <|im_sta", "<|im_start|>user\n你好🙂<|im_end|>",
    ],
    "gemma3": [
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos>text", "text <eos> more",
        "<start_of_turn><end_of_turn>", "<start_of_image> picture <end_of_image>", "almost <start_of_tu",
        "<start_of_turn>user\n你好🙂<end_of_turn>", "[multimodal] tag", "<unused0> <pad>",
    ],
}

CORPUS = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit. "
    "fn add(a: i32, b: i32) -> i32 { a + b } // Rust\n"
    "for i in range(10):\n    print(i)\n"
    "日本語のテキストと中文文本。한국어 텍스트. "
    "Ελληνικά κείμενα, русский текст, עברית, العربية. "
    "🙂🚀✨🎉 👩🏽‍💻 \t\t  \n\n  1234 56.78 9e-3 "
    "<html><body class='x'>&nbsp;</body></html> "
    "\x00\x01\x1f\x7f ¡¿«»‹›„“”‘’ "
)


def test_strings(name):
    rng = random.Random(20261124)
    out = list(HAND) + SPECIAL[name]
    while len(out) < 120:
        n = rng.randint(1, 60)
        start = rng.randint(0, len(CORPUS) - n)
        s = CORPUS[start:start + n]
        if rng.random() < 0.3:
            s = s.upper()
        out.append(s)
    return out


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, astronauts",
    "The best way to learn a new language is",
    "import numpy as np\nx = np.",
    "Photosynthesis is the process by which",
    "My favourite recipe for pancakes:",
]
CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child.",
    "List three fruits.",
    "What is 2+2?",
]


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def wait_ready(port, proc):
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    sys.exit("llama-server did not become ready")


def record(name, path, server, port, chat):
    proc = subprocess.Popen([server, "-m", path, "--host", "127.0.0.1", "--port", str(port), "-t", "2",
                             "-c", "4096", "-np", "1", "--no-warmup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        tok = []
        for s in test_strings(name):
            ids = post(port, "/tokenize", {"content": s, "add_special": True, "parse_special": True})["tokens"]
            tok.append({"text": s, "ids": ids})
        prompts = list(PROMPTS)
        if chat:
            # Chat prompts as rendered by the model's own template (llama-server applies it).
            prompts = prompts[:5]
            for c in CHAT:
                r = post(port, "/apply-template", {"messages": [{"role": "user", "content": c}]})
                prompts.append(r["prompt"])
        greedy = []
        for p in prompts:
            ids = post(port, "/tokenize", {"content": p, "add_special": True, "parse_special": True})["tokens"]
            r = post(port, "/completion", {"prompt": ids, "n_predict": 32, "temperature": 0, "top_k": 1,
                                           "samplers": ["top_k"], "cache_prompt": False, "return_tokens": True,
                                           "seed": 0})
            greedy.append({"prompt": p, "prompt_ids": ids, "output_ids": r["tokens"], "output_text": r["content"]})
        return tok, greedy
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default=os.path.expanduser("~/.cache/llama-baseline/bin/llama-server"))
    ap.add_argument("--cache", default=os.environ.get("ATOMA_MODEL_CACHE", os.path.expanduser("~/.cache/atoma/models")))
    a = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = os.path.join(here, "..", "crates", "atoma-engine", "tests", "fixtures")
    for i, (name, (file, chat)) in enumerate(MODELS.items()):
        path = os.path.join(a.cache, file)
        sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
        tok, greedy = record(name, path, a.server, 18471 + i, chat)
        out = {"model": file, "sha256": sha, "recorded_with": "llama.cpp llama-server (llama-cpp-python 0.3.36 vendored source)",
               "tokenize": tok, "greedy": greedy}
        with open(os.path.join(out_dir, f"llama-cpp-{name}.json"), "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=False, indent=1)
        print(f"{name}: {len(tok)} strings, {len(greedy)} greedy prompts")


if __name__ == "__main__":
    main()
