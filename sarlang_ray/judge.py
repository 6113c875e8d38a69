"""A judge you can run yourself: ``evaluate.judge=served`` serves an open model (``evaluate.judge_model``: a
hub name or a folder) on the cluster for the duration of the sweep, behind an OpenAI-compatible endpoint, and
the trials' judge (:class:`sarlang_ray.evaluate.OpenAIJudge`) asks it.

SARLANG-1M's published VQA rule ends in a paid judge (gpt-4o-mini after the substring and exact-match steps);
here the same last step goes to a model the evaluation starts and stops itself, so the judged number is
reproducible without an API key. The server is a **Ray Serve** application (``ray[serve]``): one replica
(``evaluate.judge_num_cpus`` / ``judge_num_gpus``) holding the model, a FastAPI ingress answering
``POST /v1/chat/completions`` and ``GET /v1/models`` (the OpenAI wire format), plus ``GET /v1/sarlang/stats``
(requests served). Its HTTP proxy listens on the driver's node address (127.0.0.1 on a one-machine Ray) at a
free port; the trials, on any node, reach it there. :func:`served_judge` starts it before the sweep and
deletes the application and shuts Serve down after it, also when the sweep fails.

The model's text side answers: a causal LM as it is, a VLM (``AutoModelForImageTextToText``: the tiny offline
VLM on a CPU-only machine, whose verdicts mean nothing but exercise the whole path) through its language model
with text-only chat turns. On a GPU node, name a real instruction model (e.g. ``Qwen/Qwen2.5-7B-Instruct``)
with ``evaluate.judge_num_gpus=1``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import uuid

log = logging.getLogger("sarlang")

APP = "sarlang-judge"
ROUTE = "/sarlang-judge"


class TextChat:
    """Greedy chat completion with a model's text side (causal LM, or a VLM without images)."""

    def __init__(self, model: str, dtype: str = "auto", use_gpu: bool = False):
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        from sarlang_ray.io import local_copy

        path = local_copy(model)
        self.torch = torch
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        torch_dtype = {
            "auto": "auto",
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
        config = AutoConfig.from_pretrained(path)
        self.vlm = hasattr(config, "vision_config")
        if self.vlm:
            self.templater = AutoProcessor.from_pretrained(path)
            self.tokenizer = self.templater.tokenizer
            self.model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=True
            )
        else:
            self.templater = self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
        # transformers types the wrapped .to() without self
        self.model.to(self.device).eval()  # type: ignore[arg-type]

    def prompt(self, messages: list[dict]) -> str:
        turns = [{"role": m.get("role", "user"), "content": _text(m.get("content"))} for m in messages]
        if self.vlm:  # processors' templates take typed content parts
            turns = [{"role": t["role"], "content": [{"type": "text", "text": t["content"]}]} for t in turns]
        if getattr(self.templater, "chat_template", None):
            return self.templater.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return "\n".join(f"{t['role']}: {_text(t['content'])}" for t in turns) + "\nassistant:"

    def __call__(self, messages: list[dict], max_tokens: int = 8) -> tuple[str, int, int]:
        """(reply, prompt tokens, completion tokens)."""
        inputs = self.tokenizer(self.prompt(messages), return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1] :]
        return (
            self.tokenizer.decode(new, skip_special_tokens=True).strip(),
            int(inputs["input_ids"].shape[1]),
            int(new.shape[0]),
        )


def _text(content) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def build_app(model: str, served_name: str, dtype: str, num_cpus: float, num_gpus: float):
    """The Ray Serve application: one replica of an OpenAI-compatible chat server around :class:`TextChat`."""
    from fastapi import FastAPI, HTTPException
    from ray import serve

    api = FastAPI()

    @serve.deployment(
        name="judge", num_replicas=1, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}
    )
    @serve.ingress(api)
    class OpenAIChatServer:
        def __init__(self):
            self.chat = TextChat(model, dtype, num_gpus > 0)
            self.requests = 0

        @api.get("/v1/models")
        def models(self) -> dict:
            return {
                "object": "list",
                "data": [{"id": served_name, "object": "model", "owned_by": "sarlang-ray"}],
            }

        @api.get("/v1/sarlang/stats")
        def stats(self) -> dict:
            return {"requests": self.requests, "model": served_name}

        @api.post("/v1/chat/completions")
        def complete(self, body: dict) -> dict:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPException(
                    status_code=400, detail="messages: a non-empty list of chat turns is required"
                )
            self.requests += 1
            reply, n_in, n_out = self.chat(messages, int(body.get("max_tokens") or 8))
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": served_name,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
            }

    # mypy keeps a decorated class's own type (python/mypy#3135): serve.deployment made it a Deployment
    return OpenAIChatServer.bind()  # type: ignore[attr-defined]


def served_name(model: str) -> str:
    """The name the server answers to: a hub name as given (``Qwen/Qwen2.5-7B-Instruct``), a folder's last
    part."""
    local = model.startswith(("/", ".", "~", "s3://", "gs://")) or model.count("/") != 1
    return model.rstrip("/").rsplit("/", 1)[-1] if local else model


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_judge(
    model: str, *, dtype: str = "auto", num_cpus: float = 1.0, num_gpus: float = 0.0, port: int | None = None
):
    """Serve ``model`` for the duration of the block; yields ``{"base_url", "model", "stats_url"}``.

    Raises:
        RuntimeError: Ray Serve is not installed (``pip install "ray[serve]"``) or the server did not come
            up."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise RuntimeError(
            'evaluate.judge=served needs Ray Serve: pip install "ray[serve]" (same version as ray)'
        ) from exc
    import requests

    host = ray.util.get_node_ip_address()
    port = port or _free_port(host)
    name = served_name(model)
    serve.start(http_options={"host": host, "port": port})
    base = f"http://{host}:{port}{ROUTE}/v1"
    try:
        serve.run(
            build_app(model, name, dtype, num_cpus, num_gpus), name=APP, route_prefix=ROUTE, blocking=False
        )
        deadline = time.time() + 600
        while True:  # serve.run returns once the replica is running; the proxy may route a moment later
            try:
                if requests.get(f"{base}/models", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the judge server for {model} did not answer at {base} within 600 s")
            time.sleep(0.5)
        log.info("evaluate: judge %s served at %s", name, base)
        yield {"base_url": base, "model": name, "stats_url": f"{base}/sarlang/stats"}
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP)
        serve.shutdown()
        log.info("evaluate: judge server stopped")
