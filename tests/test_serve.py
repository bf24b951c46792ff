"""`lmtune serve`: a real uvicorn server on 127.0.0.1, the official openai client, tiny adapters.

Adapters are made with peft on the tiny model with random (non-zero) weights, so each one changes
the model's answers; references come from peft's own forward/generate with that adapter alone.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import IA3Config, LoraConfig, OFTConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from lmtune.config import RunConfig, load_config
from lmtune.data.formats import Conversation
from lmtune.data.pipeline import make_encoder
from lmtune.errors import ConfigError, ModelError
from lmtune.infer.generate import GenRow, Sampling, generate
from lmtune.models.load import load_model, load_tokenizer, stop_token_ids
from lmtune.models.methods import load_adapters
from lmtune.serve.app import build_server, create_app, serve, served_adapters, start_in_thread

KEY = "test-key-123"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(base_dir: str, folder: Path, config, seed: int) -> str:
    torch.manual_seed(seed)
    model = get_peft_model(load_model(base_dir), config)
    for name, param in model.named_parameters():
        if "lora_B" in name or "prompt_encoder" in name or "oft_R" in name:
            torch.nn.init.normal_(param, std=2.0 if "prompt_encoder" in name else 0.5)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def lively_dir(default_model_dir, tokenizer, tmp_path_factory) -> str:
    """The tiny model with 10x larger random weights: its greedy answers vary token by token and
    follow the prompt and the adapter, where the usual tiny model repeats one token whatever it is
    asked, which would let a wrongly routed request pass unseen."""
    config = AutoConfig.from_pretrained(default_model_dir)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                   "initializer_range": 0.2})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lively")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(lively_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    lora = dict(r=4, init_lora_weights=False, task_type="CAUSAL_LM")
    return {
        "a": make_adapter(lively_dir, root / "a", LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **lora), 1),
        "b": make_adapter(lively_dir, root / "b", LoraConfig(target_modules=["o_proj", "up_proj"], **lora), 2),
        "c": make_adapter(lively_dir, root / "c", LoraConfig(target_modules=["k_proj", "gate_proj"], **lora), 3),
        "pt": make_adapter(lively_dir, root / "pt", PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), 4),
        "px": make_adapter(lively_dir, root / "px", PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), 5),
        "ia3": make_adapter(lively_dir, root / "ia3", IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False), 6),
    }


def serve_cfg(lively_dir: str, **extra) -> RunConfig:
    return RunConfig(model_name_or_path=lively_dir, do_sample=False, max_new_tokens=8,
                     cutoff_len=256, **extra)


@pytest.fixture(scope="module")
def live(lively_dir, adapters):
    """A server with the base (named after its folder) and adapters a, b, pt, px, behind KEY."""
    server = build_server(serve_cfg(lively_dir),
                          [f"{n}={adapters[n]}" for n in ("a", "b", "pt", "px")], api_key=KEY,
                          max_tokens=3000)
    server.base = Path(lively_dir).name
    port = free_port()
    http = start_in_thread(create_app(server), "127.0.0.1", port)
    server.url = f"http://127.0.0.1:{port}"
    server.client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    yield server
    http.should_exit = True
    http.thread.join(timeout=10)
    server.scheduler.close()


def named(live, name: str) -> str:
    """Tests call the base "tiny"; it serves under its folder's name."""
    return live.base if name == "tiny" else name


def peft_greedy(base_dir: str, adapter: str | None, ids: list[int], n: int) -> list[int]:
    """peft's own generate with this adapter alone (lmtune's loader for the prompt-learning ones)."""
    model = load_model(base_dir)
    if adapter:
        model = load_adapters(model, [adapter], trainable_last=False)
    model.eval()
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=n, do_sample=False, eos_token_id=[2], pad_token_id=2,
                         temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


# --- the API through the openai client ------------------------------------------------------------

def test_models_lists_the_base_and_every_adapter(live):
    ids = [m.id for m in live.client.models.list().data]
    assert ids == [live.base, "a", "b", "pt", "px"]
    assert live.client.models.retrieve("a").id == "a"


@pytest.mark.parametrize("name", ["tiny", "a", "b", "pt", "px"])
def test_each_model_answers_as_peft_does_with_that_adapter_alone(live, lively_dir, adapters, tokenizer, name):
    name = named(live, name)
    reply = live.client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=6,
                                                temperature=0)
    ids = live.adapters.models[name].encoder.prompt_ids(MESSAGES)
    expected = peft_greedy(lively_dir, adapters.get(name), ids, 6)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 6
    assert reply.choices[0].finish_reason == "length" and reply.model == name
    if name != live.base:  # the adapter really changes the answer
        assert expected != peft_greedy(lively_dir, None, ids, 6)


def test_streaming_chat_gives_the_same_text_in_openai_chunks(live):
    whole = live.client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=7, temperature=0)
    chunks = list(live.client.chat.completions.create(
        model="a", messages=MESSAGES, max_tokens=7, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completions_plain_and_streamed(live, lively_dir, tokenizer):
    ids = tokenizer("Once upon a time")["input_ids"]
    expected = tokenizer.decode(peft_greedy(lively_dir, None, ids, 5), skip_special_tokens=True)
    reply = live.client.completions.create(model=live.base, prompt="Once upon a time", max_tokens=5,
                                           temperature=0)
    assert reply.choices[0].text == expected and reply.usage.prompt_tokens == len(ids)
    streamed = live.client.completions.create(model=live.base, prompt="Once upon a time", max_tokens=5,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_seeded_sampling_repeats_and_stop_strings_cut(live):
    def ask(**kw):
        return live.client.chat.completions.create(model="b", messages=MESSAGES, max_tokens=8,
                                                   temperature=1.0, top_p=0.9, **kw).choices[0]
    first, again = ask(seed=7), ask(seed=7)
    assert first.message.content == again.message.content
    text = first.message.content
    cut = ask(seed=7, stop=[text[3:5]])
    assert cut.message.content == text[: text.find(text[3:5])] and cut.finish_reason == "stop"


# --- rendering and stopping as in training --------------------------------------------------------

def test_served_prompt_ids_equal_the_training_encoders(live, lively_dir, tokenizer):
    cfg = serve_cfg(lively_dir)
    model = load_model(lively_dir)
    train_encoder, _ = make_encoder(cfg, load_tokenizer(lively_dir), stop_token_ids(tokenizer, model),
                                    "conversation")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    row, _ = train_encoder.encode(Conversation(messages + [{"role": "assistant", "content": "Blue."}]))
    served = live.adapters.models["a"]
    prompt = served.encoder.prompt_ids(messages)
    assert row.input_ids[: len(prompt)] == prompt
    assert row.labels[len(prompt) - 1] == -100 and row.labels[len(prompt)] != -100  # reply starts here
    assert served.stop_ids == frozenset(train_encoder.stop_ids) and tokenizer.convert_tokens_to_ids("<|im_end|>") in served.stop_ids
    reply = live.client.chat.completions.create(model="a", messages=messages, max_tokens=1)
    assert reply.usage.prompt_tokens == len(prompt)


def test_generation_ends_at_an_end_of_turn_id(lively_dir, tokenizer):
    model = load_model(lively_dir).eval()
    ids = tokenizer("Hello there")["input_ids"]
    free = generate(model, [GenRow(ids, Sampling(max_new_tokens=5))], pad_id=2)[0]
    stop_at = free.tokens[2]
    row = GenRow(ids, Sampling(max_new_tokens=5), stop_ids=frozenset({stop_at}))
    stopped = generate(model, [row], pad_id=2)[0]
    assert stopped.tokens == free.tokens[: free.tokens.index(stop_at) + 1]
    assert stopped.finish_reason == "stop" and free.finish_reason == "length"


# --- many adapters, one base ----------------------------------------------------------------------

def test_a_mixed_batch_gives_each_row_what_it_gets_alone(live):
    prompts = [live.adapters.models[live.base].encoder.prompt_ids([{"role": "user", "content": t}])
               for t in ("Hi", "What is the capital of France?", "Count to three, please.")]
    plan = [("a", 0), (live.base, 1), ("b", 2), ("a", 1), ("b", 0)]

    def rows(items, sampling):
        return [GenRow(prompts[p], sampling(i), live.adapters.models[n].stop_ids, n)
                for i, (n, p) in enumerate(items)]

    for sampling in (lambda i: Sampling(max_new_tokens=6),
                     lambda i: Sampling(max_new_tokens=6, temperature=1.0, seed=100 + i)):
        with live.adapters.lock:
            mixed = live.adapters.generate(live.adapters.models[live.base], rows(plan, sampling), lambda i, t: True)
            alone = [live.adapters.generate(live.adapters.models[n], rows([(n, p)], lambda _: sampling(i)),
                                            lambda i, t: True)[0] for i, (n, p) in enumerate(plan)]
        assert [r.tokens for r in mixed] == [r.tokens for r in alone]
    assert len({tuple(r.tokens) for r in mixed}) > 1


def test_an_oft_adapter_serves_as_peft_runs_it(lively_dir, tokenizer, tmp_path):
    # OFT starts as the identity rotation; make_adapter's random weights make it change the answer.
    oft = make_adapter(lively_dir, tmp_path / "oft", OFTConfig(oft_block_size=16, r=0,
                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), 7)
    server = build_server(serve_cfg(lively_dir), [f"oft={oft}"])
    try:
        served = server.adapters.models["oft"]
        ids = served.encoder.prompt_ids(MESSAGES)
        with server.adapters.lock:
            reply = server.adapters.generate(served, [GenRow(ids, Sampling(max_new_tokens=6),
                                                             served.stop_ids, "oft")], lambda i, t: True)[0]
        expected = peft_greedy(lively_dir, oft, ids, 6)
        assert reply.tokens == expected and expected != peft_greedy(lively_dir, None, ids, 6)
    finally:
        server.scheduler.close()


def test_requests_for_different_adapters_share_one_batch(live):
    before = live.scheduler.batches
    results = {}

    def ask(name):
        results[name] = live.client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=3)

    with live.adapters.lock:  # the worker takes the first request, then waits for the model
        first = threading.Thread(target=ask, args=("a",))
        first.start()
        wait_for(lambda: live.scheduler.running)
        others = [threading.Thread(target=ask, args=(n,)) for n in ("b", live.base, "pt")]
        for t in others:
            t.start()
        wait_for(lambda: len(live.scheduler.waiting) == 3)
    for t in [first, *others]:
        t.join(timeout=30)
    # a; then b and tiny together (one LoRA mixed batch); pt runs with its own virtual tokens.
    assert live.scheduler.batches - before == 3
    assert all(results[n].choices[0].message.content for n in ("a", "b", live.base, "pt"))


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_load_and_unload_adapters_at_run_time(live, adapters):
    headers = {"Authorization": f"Bearer {KEY}"}
    created = httpx.post(live.url + "/v1/adapters", json={"path": adapters["c"], "name": "c"}, headers=headers)
    assert created.status_code == 201 and created.json()["id"] == "c"
    assert "c" in [m.id for m in live.client.models.list().data]
    assert live.client.chat.completions.create(model="c", messages=MESSAGES, max_tokens=2).choices
    again = httpx.post(live.url + "/v1/adapters", json={"path": adapters["c"], "name": "c"}, headers=headers)
    assert again.status_code == 409
    other_type = httpx.post(live.url + "/v1/adapters", json={"path": adapters["ia3"]}, headers=headers)
    assert other_type.status_code == 400 and "one weight-adapter type" in other_type.json()["error"]["message"]
    deleted = httpx.delete(live.url + "/v1/adapters/c", headers=headers)
    assert deleted.json() == {"id": "c", "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        live.client.chat.completions.create(model="c", messages=MESSAGES, max_tokens=2)
    assert "c" not in live.adapters.peft.peft_config  # its weights are gone, not only its name


# --- refusals in OpenAI's error shape ---------------------------------------------------------------

def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_get_4xx_in_openai_shape(live):
    url, auth = live.url, {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "a", "messages": MESSAGES, "max_tokens": 2}
    assert error_of(httpx.post(url + "/v1/chat/completions", json=chat), 401)["code"] == "invalid_api_key"
    error_of(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert error_of(httpx.post(url + "/v1/chat/completions", json=chat | {"model": "nope"}, headers=auth),
                    404)["code"] == "model_not_found"
    big = chat | {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    error_of(httpx.post(url + "/v1/chat/completions", json=big, headers=auth), 413)
    for field, value in [("temperature", 5), ("n", 2), ("max_tokens", 0), ("max_tokens", 10**6),
                         ("messages", []), ("stop", ["a"] * 9), ("logprobs", True)]:
        param = error_of(httpx.post(url + "/v1/chat/completions", json=chat | {field: value},
                                    headers=auth), 400)["param"]
        assert param.startswith(field)
    error_of(httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=auth), 400)
    error_of(httpx.post(url + "/v1/chat/completions", json=chat | {"messages": [{"role": "robot", "content": "x"}]},
                        headers=auth), 400)
    error_of(httpx.post(url + "/v1/chat/completions", json=chat | {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, headers=auth), 400)
    long_prompt = chat | {"messages": [{"role": "user", "content": "word " * 400}]}
    assert error_of(httpx.post(url + "/v1/chat/completions", json=long_prompt, headers=auth),
                    400)["code"] == "context_length_exceeded"
    error_of(httpx.get(url + "/v1/nothing-here", headers=auth), 404)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_client_leaving_mid_stream_frees_its_place(live):
    seen = []
    original = live.adapters.generate

    def spy(served, rows, on_token):
        results = original(served, rows, on_token)
        seen.extend(results)
        return results

    live.adapters.generate = spy
    try:
        body = {"model": "a", "messages": MESSAGES, "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
        wait_for(lambda: seen)
        assert seen[0].finish_reason == "ended" and len(seen[0].tokens) < 3000
        assert not live.scheduler.running and not live.scheduler.waiting
    finally:
        live.adapters.generate = original


def test_fifty_concurrent_clients_lose_nothing_and_leak_nothing(live):
    async def client(i: int, rounds: int) -> list[str]:
        async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as http:
            answers = []
            for _ in range(rounds):
                name = (live.base, "a", "b", "px")[i % 4]
                r = await http.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": f"Client {i}"}],
                    "max_tokens": 3, "stream": i % 2 == 0})
                assert r.status_code == 200, r.text
                answers.append(r.text)
            return answers

    async def round_of(rounds: int) -> list[list[str]]:
        return await asyncio.gather(*(client(i, rounds) for i in range(50)))

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    asyncio.run(round_of(1))  # warm-up: allocator pools, thread pools
    start = rss()
    answers = asyncio.run(round_of(3))
    assert sum(len(a) for a in answers) == 150 and all(x for a in answers for x in a)
    assert all("[DONE]" in x for i, a in enumerate(answers) if i % 2 == 0 for x in a)
    # A streamed answer's last chunk reaches its client before the worker retires the request, so
    # on a busy machine the queues may need a moment to empty; a leaked request never would.
    wait_for(lambda: not live.scheduler.running and not live.scheduler.waiting, seconds=10)
    assert rss() - start < 64 * 2**20


# --- configs, the CLI and refusals at start ---------------------------------------------------------

def test_llamafactory_inference_yaml_serves_unchanged(tmp_path, lively_dir, adapters):
    path = tmp_path / "infer.yaml"
    path.write_text(f"model_name_or_path: {lively_dir}\nadapter_name_or_path: {adapters['a']}\n"
                    "template: qwen\ninfer_backend: huggingface\ntrust_remote_code: false\n")
    cfg = load_config(path)
    assert served_adapters(cfg, ["other=" + adapters["b"]]) == (
        lively_dir, [], [("a", adapters["a"]), ("other", adapters["b"])])
    with pytest.raises(ConfigError, match="sglang"):
        load_config(path, ["infer_backend=sglang"])
    with pytest.raises(ConfigError, match="two adapters are named 'a'"):
        served_adapters(cfg, ["a=" + adapters["b"]])
    with pytest.raises(ModelError, match="not a valid model name"):
        served_adapters(cfg, ["../x=" + adapters["b"]])


def test_vllm_backend_falls_back_with_a_note(lively_dir, capsys):
    server = build_server(serve_cfg(lively_dir, infer_backend="vllm"), [])
    server.scheduler.close()
    assert "serving with the built-in backend" in capsys.readouterr().out


@pytest.mark.slow  # a fresh process imports torch, transformers and peft: ~10 s idle, a minute under load
def test_adapter_routes_need_a_key_and_the_cli_binds_loopback(tmp_path, lively_dir, adapters):
    port = free_port()
    cmd = [sys.executable, "-m", "lmtune.cli", "serve", f"model_name_or_path={lively_dir}",
           "--adapter", f"a={adapters['a']}", "--port", str(port)]
    with pytest.raises(ConfigError, match="no API key is set"):
        serve(serve_cfg(lively_dir), [], host="0.0.0.0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(url) or proc.poll() is not None, 180)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [Path(lively_dir).name, "a"]
        error_of(httpx.post(url + "/v1/adapters", json={"path": adapters["b"]}), 403)
        error_of(httpx.delete(url + "/v1/adapters/a"), 403)
        reply = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="a", messages=MESSAGES, max_tokens=2)
        assert reply.usage.completion_tokens == 2
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"serving {Path(lively_dir).name}, a at {url}/v1" in output


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/v1/models").status_code == 200
    except httpx.TransportError:
        return False
