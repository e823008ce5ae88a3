#!/usr/bin/env python3
"""Checks `hone serve` with the official `openai` Python client (pip install openai).

Starts `hone serve` on 127.0.0.1 (port chosen by the OS) over the PEFT fixture model
fixtures/peft/llama_gqa with its real PEFT adapter served as `peft`, then, through the client:
lists the models, makes a completion, streams a chat completion (and compares it with the
non-streamed one), chooses the adapter per request, and checks the client's typed errors for an
unknown model and a wrong key. Prints one line per check and a closing `N passed, N failed`.

Usage: python3 scripts/openai_client_check.py [--hone target/release/hone]
       python3 scripts/openai_client_check.py --base-url http://127.0.0.1:8080/v1 \
           --api-key KEY --base-model NAME --adapter-model NAME   (a server already running)
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "openai-client-check"


def start_server(hone):
    fixture = os.path.join(ROOT, "fixtures/peft/llama_gqa")
    cmd = [
        hone, "serve", "--model", fixture, "--port", "0", "--chat-template", "chatml",
        "--api-key", API_KEY, "--adapter", "peft=" + os.path.join(fixture, "adapter"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        sys.exit(f"hone serve did not start: {line!r}")
    addr = line.split("http://", 1)[1].split()[0]
    return proc, f"http://{addr}/v1", "llama_gqa", "peft"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hone", default=os.path.join(ROOT, "target/release/hone"))
    parser.add_argument("--base-url")
    parser.add_argument("--api-key", default=API_KEY)
    parser.add_argument("--base-model")
    parser.add_argument("--adapter-model")
    args = parser.parse_args()

    import openai  # imported here so that --help works without it

    proc = None
    if args.base_url:
        base_url, base, adapter = args.base_url, args.base_model, args.adapter_model
        if not (base and adapter):
            sys.exit("--base-url needs --base-model and --adapter-model")
        if not any(h in base_url for h in ("127.0.0.1", "localhost", "[::1]")):
            sys.exit("only loopback servers are checked")
    else:
        proc, base_url, base, adapter = start_server(args.hone)
    client = openai.OpenAI(base_url=base_url, api_key=args.api_key, timeout=60, max_retries=0)
    results = []

    def check(name, fn):
        started = time.time()
        try:
            detail = fn()
            results.append(True)
            print(f"ok   {name} ({time.time() - started:.2f}s){': ' + detail if detail else ''}")
        except Exception as e:  # report every failure, keep going
            results.append(False)
            print(f"FAIL {name}: {type(e).__name__}: {e}")

    def models():
        ids = [m.id for m in client.models.list().data]
        assert base in ids and adapter in ids, ids
        return ", ".join(ids)

    def completion():
        r = client.completions.create(model=base, prompt="hello world", max_tokens=8, temperature=0)
        assert r.object == "text_completion", r
        assert r.choices[0].finish_reason in ("stop", "length"), r
        u = r.usage
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens > 0, u
        return repr(r.choices[0].text)

    messages = [{"role": "user", "content": "Say something."}]

    def streamed_chat():
        whole = client.chat.completions.create(
            model=base, messages=messages, max_tokens=12, temperature=0)
        stream = client.chat.completions.create(
            model=base, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True})
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
        text = "".join(pieces)
        assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
        assert finish == whole.choices[0].finish_reason, (finish, whole)
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
        return f"{len(pieces)} deltas, {repr(text)}"

    def adapter_choice():
        prompt = [5, 17, 300, 42, 7]
        out = {}
        for model in (base, adapter, base):
            r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.model == model, r
            out.setdefault(model, set()).add(r.choices[0].text)
        assert len(out[base]) == 1, out  # greedy: the same text each time
        assert out[base] != out[adapter], out
        return "base and adapter differ"

    def unknown_model():
        try:
            client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        except openai.NotFoundError as e:
            assert e.status_code == 404
            return e.body.get("message", "") if isinstance(e.body, dict) else ""
        raise AssertionError("no 404")

    def wrong_key():
        bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
        try:
            bad.models.list()
        except openai.AuthenticationError as e:
            assert e.status_code == 401
            return None
        raise AssertionError("no 401")

    try:
        check("list models", models)
        check("completion", completion)
        check("streamed chat equals non-streamed chat", streamed_chat)
        check("adapter chosen per request", adapter_choice)
        check("unknown model is NotFoundError", unknown_model)
        check("wrong key is AuthenticationError", wrong_key)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
