"""The openai backend against a real OpenAI-compatible HTTP server started here on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO, TEST_OPENAI_KEY

from sarlang_ray import pipeline
from sarlang_ray.annotate.visibility import Visibility
from sarlang_ray.annotate.vocab import CLASS_WORDS
from sarlang_ray.config import load_config


class ChatServer:
    """/v1/chat/completions with deterministic misbehaviour keyed on the prompt:
    hash % 5 == 0: HTTP 500 the first time (a retry succeeds); % 7 == 0: too slow, always (timeout);
    % 11 == 0: prose instead of JSON (malformed)."""

    def __init__(self):
        self.seen: Counter = Counter()
        self.stats: Counter = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {TEST_OPENAI_KEY}":
                    with server.lock:
                        server.stats["401"] += 1
                    return self._send(401, {"error": "bad key"})
                status, content = server.reply(body)
                if status != 200:
                    return self._send(status, {"error": "boom"})
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reply(self, body):
        content = body["messages"][0]["content"]
        if isinstance(content, list):  # a captioning request with the image
            return 200, self.caption(content)
        h = int(hashlib.sha1(content.encode()).hexdigest(), 16)
        with self.lock:
            self.seen[h] += 1
            first = self.seen[h] == 1
            self.stats["qa"] += 1
        if h % 5 == 0 and first:
            with self.lock:
                self.stats["500"] += 1
            return 500, None
        if h % 7 == 0:
            time.sleep(2.5)
            return 200, "[]"
        if h % 11 == 0:
            return 200, "Sure! Here are some questions about the image."
        return 200, self.qa_answer(content)

    def caption(self, content: list) -> str:
        text = content[1]["text"]
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
        with self.lock:
            self.stats["caption"] += 1
        if "one sentence" in text:
            return "An overhead radar-like view of the scene."
        return (
            "This overhead image shows the land cover and the layout of the scene seen from above in detail."
        )

    @staticmethod
    def qa_answer(content: str) -> str:
        """A well-formed QA reply: the count of the objects the prompt lists, and a pair to drop."""
        objects = re.search(
            r"Objects in the image \(class, position\): (.*?)\. Land cover", content, re.DOTALL
        ).group(1)
        n = 0 if objects == "none" else len(objects.split("), "))
        return (
            "```json\n"
            + json.dumps(
                [
                    {
                        "application": "instance counting",
                        "question": "How many labelled objects are there?",
                        "answer": str(n),
                    },
                    # not one of the seven: dropped
                    {
                        "application": "astrology",
                        "question": "Dropped?",
                        "answer": "yes",
                    },
                ]
            )
            + "\n```"
        )

    def stop(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def chat_server():
    server = ChatServer()
    yield server
    server.stop()


@pytest.mark.slow
def test_openai_backend_end_to_end(demo_run, chat_server, tmp_path):
    cfg, _ = demo_run
    run_dir = tmp_path / "llm"
    shutil.copytree(cfg.run.run_dir, run_dir, ignore=shutil.ignore_patterns("annotate", "export", "archive"))
    llm = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            "annotate.backend=openai",
            f"annotate.openai.base_url={chat_server.url}",
            "annotate.openai.api_key_env=SARLANG_TEST_OPENAI_KEY",
            "annotate.openai.timeout_s=1",
            "annotate.openai.max_retries=1",
            "annotate.openai.backoff_s=0.1",
            "ray.progress=false",
        ],
    )
    summary = pipeline.run(llm, ["annotate"])
    counts = summary["stages"]["annotate"]
    assert counts["planned"] == counts["written"] + counts["rejected"]
    errors = [e for e in pipeline.read_errors(str(run_dir)).to_pylist() if e["stage"] == "annotate"]
    messages = " ".join(e["message"] for e in errors)
    assert "timeout" in messages and "not a JSON list" in messages
    assert counts["rejected"] == len(errors) > 0 and counts["written"] > 0
    assert chat_server.stats["500"] > 0  # and those tiles still made it, through a retry

    pairs = pipeline.read_annotations(str(run_dir)).to_pylist()
    assert {p["backend"] for p in pairs} == {"openai"}
    tiles = {
        t["tile_id"]: t
        for t in pipeline.read_tiles(
            str(run_dir), columns=["tile_id", "gsd_m", "objects", "landcover"]
        ).to_pylist()
    }
    vqa = [p for p in pairs if p["kind"] == "vqa"]
    # the invalid application was dropped
    assert vqa and all(p["application"] == "instance counting" for p in vqa)
    for (
        p
    ) in vqa:  # the prompt lists the objects that can be seen at the tile's GSD (no 0.1-pixel cars at 10 m)
        seen = Visibility().view(tiles[p["tile_id"]], tuple(CLASS_WORDS)).seen
        assert int(p["answer"]) == min(len(seen), 60)
    captions = [p for p in pairs if p["kind"] != "vqa"]
    assert captions and all(p["qc_passed"] for p in captions)

    secret_free = (run_dir / "config.yaml").read_text() + json.dumps(errors)
    assert (
        TEST_OPENAI_KEY not in secret_free
        and "SARLANG_TEST_OPENAI_KEY" in (run_dir / "config.yaml").read_text()
    )


def test_openai_backend_without_its_key_fails_at_annotate_naming_the_variable(
    demo_run, chat_server, tmp_path, capsys
):
    """The key variable unset: every request is answered 401, every tile is a backend_error. The command
    exits non-zero at annotate (not two stages later in train), with the reason counts and the variable's
    name, and annotate writes no _SUCCESS.json, so nothing downstream takes the empty table for data."""
    import os

    from sarlang_ray import cli

    cfg, _ = demo_run
    run_dir = tmp_path / "nokey"
    shutil.copytree(cfg.run.run_dir, run_dir, ignore=shutil.ignore_patterns("annotate", "export", "archive"))
    assert "SARLANG_TEST_UNSET_KEY" not in os.environ
    before = chat_server.stats["401"]
    rc = cli.main(
        [
            "annotate",
            f"run.run_dir={run_dir}",
            "annotate.backend=openai",
            f"annotate.openai.base_url={chat_server.url}",
            "annotate.openai.api_key_env=SARLANG_TEST_UNSET_KEY",
            "annotate.openai.max_retries=0",
            "ray.progress=false",
        ]
    )
    err = capsys.readouterr().err
    tiles = pipeline.read_tiles(str(run_dir), columns=["tile_id"]).num_rows
    assert rc == 1
    assert (
        f"sarlang annotate: failed: annotate: all {tiles} planned items were rejected (backend_error: "
        f"{tiles})" in err
    )
    assert "SARLANG_TEST_UNSET_KEY" in err and "is not set" in err
    assert chat_server.stats["401"] - before >= tiles  # the server was asked, and refused
    assert not (run_dir / "annotate" / "_SUCCESS.json").exists() and not (run_dir / "export").exists()


class HealingServer(ChatServer):
    """Counts every request; until ``healed``, the QA request of a tile whose prompt hashes to a multiple of 3
    gets HTTP 500 (with annotate.openai.max_retries=0 the tile fails: 3 requests, 2 captions and the QA)."""

    def __init__(self):
        super().__init__()
        self.healed, self.calls = False, 0

    def reply(self, body):
        content = body["messages"][0]["content"]
        with self.lock:
            self.calls += 1
        if isinstance(content, list):
            return 200, self.caption(content)
        if not self.healed and int(hashlib.sha1(content.encode()).hexdigest(), 16) % 3 == 0:
            return 500, None
        return 200, self.qa_answer(content)


def test_a_retry_redoes_only_the_failed_tiles(demo_run, tmp_path):
    """`sarlang annotate ... run.retry_errors=true` after an endpoint outage: only the tiles of the errors
    table are asked again (the server counts the requests), the other pairs are kept as they were, the counts
    and the errors table are updated, and the export made from the old annotations is redone."""
    from sarlang_ray import cli, io

    cfg, _ = demo_run
    run_dir = tmp_path / "retry"
    shutil.copytree(cfg.run.run_dir, run_dir, ignore=shutil.ignore_patterns("annotate", "export", "archive"))
    server = HealingServer()
    try:
        argv = [
            "annotate",
            str(REPO / "workflows" / "demo.yaml"),
            f"run.run_dir={run_dir}",
            f"synth.out_dir={cfg.synth.out_dir}",
            "annotate.backend=openai",
            f"annotate.openai.base_url={server.url}",
            "annotate.openai.api_key_env=SARLANG_TEST_OPENAI_KEY",
            "annotate.openai.max_retries=0",
            "ray.progress=false",
            "run.stages=[synth,catalog,tile,align,annotate,export]",
        ]
        assert cli.main(argv) == 0
        assert cli.main(["export", *argv[1:]]) == 0
        first = io.read_json(str(run_dir / "annotate" / "_SUCCESS.json"))
        failed = {
            e["item"] for e in pipeline.read_errors(str(run_dir)).to_pylist() if e["stage"] == "annotate"
        }
        assert 0 < first["rejected"] == len(failed) < first["planned"]
        assert server.calls == 3 * first["planned"]
        kept = sorted(
            json.dumps(r, sort_keys=True) for r in pipeline.read_annotations(str(run_dir)).to_pylist()
        )
        export_before = io.read_json(str(run_dir / "export" / "_SUCCESS.json"))

        server.healed, server.calls = True, 0
        assert cli.main([*argv, "run.retry_errors=true"]) == 0
        assert server.calls == 3 * len(failed)  # the failed tiles' requests, and no other
        after = io.read_json(str(run_dir / "annotate" / "_SUCCESS.json"))
        assert (after["planned"], after["written"], after["rejected"], after["retried"]) == (
            first["planned"],
            first["planned"],
            0,
            len(failed),
        )
        assert (
            after["fingerprint"]["value"] == first["fingerprint"]["value"]
            and after["fingerprint"]["retries"] == 1
        )
        assert not [e for e in pipeline.read_errors(str(run_dir)).to_pylist() if e["stage"] == "annotate"]
        pairs = pipeline.read_annotations(str(run_dir)).to_pylist()
        assert {p["tile_id"] for p in pairs} >= failed and len({p["pair_id"] for p in pairs}) == len(pairs)
        # the others, as they were
        assert sorted(json.dumps(r, sort_keys=True) for r in pairs if r["tile_id"] not in failed) == kept
        export_after = io.read_json(str(run_dir / "export" / "_SUCCESS.json"))
        assert (
            export_after["fingerprint"]["inputs"]["annotate"]
            != export_before["fingerprint"]["inputs"]["annotate"]
        )
        assert export_after["planned"] > export_before["planned"]  # the recovered tiles are exported

        server.calls = 0  # nothing left to retry: a no-op
        assert cli.main([*argv, "run.retry_errors=true"]) == 0
        assert server.calls == 0
    finally:
        server.stop()
