"""Security: weights load from safetensors only, releases cannot point outside themselves, scene ids are
path-safe, and no secret reaches the run folder or the logs."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_OPENAI_KEY
from hypothesis import given, settings
from hypothesis import strategies as st

from sarlang_ray import io, pipeline
from sarlang_ray.catalog import scene_id_for
from sarlang_ray.config import load_config, to_yaml
from sarlang_ray.errors import ItemError, redact_text
from sarlang_ray.export import import_sarlang1m
from sarlang_ray.stages.stage import StageFailed
from sarlang_ray.tiling import shard_name, tile_id_for

PACKAGE = REPO / "sarlang_ray"


# ------------------------------------------------------------------ (a) weights: safetensors only
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node, node.func.attr, ast.unparse(node.func.value)


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<not a constant>"
    return None


# from_pretrained of these reads no weights (JSON and tokenizer files only)
_NOT_WEIGHTS = re.compile(r"(Processor|Tokenizer|TokenizerFast|Config|FeatureExtractor)$")


# The one place the package unpickles: the driver reads back its own manifest spool
# (stages.execution.Manifest),
# a private file it made with tempfile.mkstemp (mode 0600) and wrote itself in the same process. Nothing read
# from a run folder, a checkpoint or a download is unpickled (the test below checks the spool stays that kind
# of file).
_OWN_SPOOLS = {("sarlang_ray/stages/execution.py", "pickle", "load")}


def test_the_only_unpickled_file_is_the_drivers_own_private_spool():
    from sarlang_ray.stages.execution import Manifest

    m = Manifest()
    try:
        m.append({"index": 1, "node": "n"})
        assert os.stat(m.path).st_mode & 0o077 == 0, oct(os.stat(m.path).st_mode)  # no one else may write it
        # the driver's own temporary folder, not a run folder
        assert os.path.dirname(m.path) == tempfile.gettempdir()
        assert list(m) == [{"index": 1, "node": "n"}]
    finally:
        m.close()
    assert not os.path.exists(m.path)


def test_weights_load_from_safetensors_only_and_no_pickle_anywhere_in_the_package():
    problems, model_loads, torch_loads = [], 0, 0
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call, attr, owner in _calls(tree):
            where = f"{path.relative_to(REPO)}:{call.lineno} {owner}.{attr}"
            if attr == "from_pretrained" and not _NOT_WEIGHTS.search(owner):
                model_loads += 1
                if _kw(call, "use_safetensors") is not True:
                    problems.append(f"{where}: pass use_safetensors=True")
            if (owner, attr) == ("torch", "load"):
                torch_loads += 1
                if _kw(call, "weights_only") is not True:
                    problems.append(f"{where}: pass weights_only=True")
            if _kw(call, "trust_remote_code") not in (None, False):
                problems.append(f"{where}: trust_remote_code runs code from the checkpoint")
            if attr == "save_pretrained" and _kw(call, "safe_serialization") is False:
                problems.append(f"{where}: safe_serialization=False writes pickles")
            unpickles = (owner, attr) in (
                ("pickle", "load"),
                ("pickle", "loads"),
                ("joblib", "load"),
                ("dill", "load"),
            )
            if unpickles and (path.relative_to(REPO).as_posix(), owner, attr) not in _OWN_SPOOLS:
                problems.append(f"{where}: unpickling runs code")
            if (owner, attr) == ("np", "load") and _kw(call, "allow_pickle") not in (None, False):
                problems.append(f"{where}: allow_pickle runs code")
    assert model_loads >= 2 and torch_loads >= 1, (
        "the scan found none of the known loads: is it still looking?"
    )
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ (b) releases cannot point outside
# themselves
def _release(root: Path, caption_image: str = "t1.png", vqa_image: str = "SAR_images/t1.png") -> str:
    (root / "captions").mkdir(parents=True)
    (root / "vqa").mkdir()
    (root / "captions" / "concise_train.csv").write_text(f"image,caption\n{caption_image},A harbour.\n")
    record = {
        "messages": [
            {"role": "user", "content": "<image>How many ships?"},
            {"role": "assistant", "content": "2"},
        ],
        "images": [vqa_image],
    }
    (root / "vqa" / "vqa_train.json").write_text(json.dumps([record]))
    return str(root)


def test_a_clean_release_imports(tmp_path):
    rows = import_sarlang1m(_release(tmp_path / "r")).to_pylist()
    assert [r["image_uri"] for r in rows] == [f"{tmp_path}/r/SAR_images/t1.png"] * 2


@pytest.mark.parametrize(
    "caption_image, vqa_image, bad",
    [
        ("../../etc/passwd", "SAR_images/t1.png", "../../etc/passwd"),  # the CSV climbs out of SAR_images/
        ("t1.png", "../../../etc/passwd", "../../../etc/passwd"),  # the JSON climbs out of the release
        ("t1.png", "/etc/passwd", "/etc/passwd"),  # absolute
        ("t1.png", "SAR_images/../../x.png", "SAR_images/../../x.png"),  # .. in the middle
        ("t1.png", "s3://elsewhere/x.png", "s3://elsewhere/x.png"),  # another filesystem
        ("t1.png", "C:\\Windows\\x.png", "C:\\Windows\\x.png"),  # a Windows path
        ("t1.png", "SAR_images/t1.png\x00.txt", "SAR_images/t1.png\x00.txt"),  # NUL
    ],
)
def test_release_paths_that_leave_the_release_are_rejected_naming_the_entry(
    tmp_path, caption_image, vqa_image, bad
):
    root = _release(tmp_path / "r", caption_image, vqa_image)
    with pytest.raises(ItemError) as info:
        import_sarlang1m(root)
    assert info.value.error_class == "unsafe_path"
    message = str(info.value)
    assert repr(bad if bad != "../../etc/passwd" else "SAR_images/../../etc/passwd") in message
    assert ("concise_train.csv line 2" if bad == caption_image else "vqa_train.json record 0") in message


def test_a_zip_or_a_typo_is_not_silently_an_empty_release(tmp_path):
    import zipfile

    release = _release(tmp_path / "r")
    with zipfile.ZipFile(tmp_path / "r.zip", "w") as z:
        # a hostile member name too
        z.write(Path(release) / "vqa" / "vqa_train.json", "../../vqa/vqa_train.json")
    for root in (str(tmp_path / "r.zip"), str(tmp_path / "missing")):
        with pytest.raises(ItemError, match="Unpack the release") as info:
            import_sarlang1m(root)
        assert info.value.error_class == "not_a_release" and root in str(info.value)
    assert not (tmp_path.parent / "vqa").exists(), "nothing was extracted"


def test_a_malformed_release_record_is_a_clear_error(tmp_path):
    root = _release(tmp_path / "r")
    (Path(root) / "vqa" / "vqa_train.json").write_text(json.dumps([{"images": ["SAR_images/t1.png"]}]))
    with pytest.raises(ItemError, match="record 0: needs messages") as info:
        import_sarlang1m(root)
    assert info.value.error_class == "malformed_release"


# ------------------------------------------------------------------ (c) scene ids are path-safe
HOSTILE = st.one_of(
    st.lists(
        st.sampled_from(
            list("./\\\x00 \t\n~$*?:'\"") + ["..", "İ", "ß", "字", "\u202e", "\udcff", "a", "Z", "9"]
        ),
        max_size=40,
    ).map("".join),  # path syntax, unicode, a lone surrogate (a non-UTF-8 file name)
    st.text(max_size=300),
    st.sampled_from(
        [
            "..",
            "../../etc/passwd",
            "/etc/passwd",
            "",
            ".",
            "a" * 1000,
            "\x00",
            "CON",
            "scene.tif/..",
            "s3://bucket/x.tif",
            "%2e%2e%2f",
        ]
    ),
)


@settings(max_examples=100, deadline=None)
@given(name=HOSTILE, inside=st.booleans())
def test_scene_ids_from_hostile_file_names_are_path_safe(name, inside):
    archive, run_dir = "/data/archive", "/runs/r"
    uri = f"{archive}/sar/{name}" if inside else name
    sid = scene_id_for(uri, archive)
    assert re.fullmatch(r"[a-z0-9_]+-[0-9a-f]{8}", sid) and len(sid) <= 48 + 9, sid
    assert sid == scene_id_for(uri, archive), "stable"
    for path in (
        io.join(run_dir, "tile", "shards", shard_name(sid, 0.5, 3)),
        io.join(run_dir, "align", "shards", sid, tile_id_for(sid, 10.0, 1, 2) + ".png"),
    ):
        assert os.path.normpath(path).startswith(f"{run_dir}/"), path


# ------------------------------------------------------------------ (d) secrets
def test_redact_text():
    os.environ["SARLANG_REDACT_TEST_TOKEN"] = "tok-0123456789"
    try:
        text = redact_text(
            "s3://AKIAX:wJalrXUt@bkt/a https://ghp_abc@github.com/x http://u:p@h:1/v1 "
            "s3://bkt/a@b.tif key=tok-0123456789 Basic c2FybGFuZzpw short=abc"
        )
    finally:
        del os.environ["SARLANG_REDACT_TEST_TOKEN"]
    assert text == (
        "s3://AKIAX:***@bkt/a https://***@github.com/x http://u:***@h:1/v1 "
        "s3://bkt/a@b.tif key=*** Basic *** short=abc"
    )


def test_secrets_interpolated_from_the_environment_are_redacted_in_the_saved_config(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-aws-secret-0f1e2d3c4b5a")
    cfg = load_config(None, ["annotate.openai.model=${oc.env:AWS_SECRET_ACCESS_KEY}"])
    assert cfg.annotate.openai.model == "fake-aws-secret-0f1e2d3c4b5a"  # the run itself gets the value
    assert "fake-aws-secret" not in to_yaml(cfg)


class RejectingChatServer:
    """An OpenAI-compatible endpoint that answers 401 and, like some real ones, echoes the key it got."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                data = json.dumps({"error": f"invalid key {self.headers.get('Authorization')}"}).encode()
                self.send_response(401)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_a_password_in_the_endpoint_url_never_reaches_an_error_row():
    """requests turns user:password@ in a URL into HTTP Basic auth; servers echo it, errors quote the URL."""
    import base64

    from sarlang_ray.annotate.openai_backend import OpenAIAnnotator
    from sarlang_ray.config import AnnotateSection, OpenAISection
    from sarlang_ray.errors import error_row

    password = "url-password-5e4d3c2b1a"
    server = RejectingChatServer()
    try:
        url = f"http://sarlang:{password}@127.0.0.1:{server.port}/v1"
        backend = OpenAIAnnotator(
            AnnotateSection(openai=OpenAISection(base_url=url, max_retries=0, timeout_s=5))
        )
        with pytest.raises(Exception) as info:
            backend._chat([{"role": "user", "content": "hello"}])
    finally:
        server.httpd.shutdown()
    row = error_row("annotate", "t", "backend_error", f"backend failed: {info.value}")
    basic = base64.b64encode(f"sarlang:{password}".encode()).decode()
    assert basic in str(info.value), "the server did echo the credential (else this test proves nothing)"
    assert password not in json.dumps(row) and basic not in json.dumps(row)
    assert "http://sarlang:***@127.0.0.1" in row["message"] and "invalid key Basic ***" in row["message"]


def _texts_under(root: Path):
    """(path, text) of every file under root; Parquet decoded (its pages are compressed)."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            yield path, json.dumps(pq.read_table(path).to_pylist(), default=repr)
        else:
            yield path, path.read_bytes().decode("utf-8", "replace")


@pytest.mark.slow
def test_no_secret_reaches_the_run_folder_or_the_logs(ray_session, tmp_path, monkeypatch, caplog, capfd):
    aws_secret = "fake-aws-secret-9f8e7d6c5b4a"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    server = RejectingChatServer()
    run_dir = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            f"synth.out_dir={tmp_path}/archive",
            "synth.scene_size_px=128",
            "ray.progress=false",
            "run.stages=[synth,catalog,tile,align,annotate]",
            "tile.gsds_m=[]",
            "tile.include_native=true",
            "tile.tile_size=64",
            "annotate.backend=openai",
            "annotate.openai.api_key_env=SARLANG_TEST_OPENAI_KEY",  # set before Ray started
            f"annotate.openai.base_url=http://127.0.0.1:{server.port}/v1",
            "annotate.openai.max_retries=0",
            "annotate.openai.timeout_s=5",
        ],
    )
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(
            StageFailed, match="backend_error"
        ) as failed:  # every tile rejected: the stage fails
            pipeline.run(cfg)
    finally:
        server.httpd.shutdown()
    errors = [e for e in pipeline.read_errors(str(run_dir)).to_pylist() if e["stage"] == "annotate"]
    assert errors and f"backend_error: {len(errors)}" in str(failed.value)
    assert aws_secret not in str(failed.value) and TEST_OPENAI_KEY not in str(failed.value)
    # the server echoed the key it was sent: the row keeps the reason, not the key
    assert all("HTTP 401" in e["message"] and "invalid key Bearer ***" in e["message"] for e in errors), (
        errors[0]
    )

    secrets = (aws_secret, TEST_OPENAI_KEY)
    leaks = [(str(p), s) for p, text in _texts_under(run_dir) for s in secrets if s in text]
    out, err = capfd.readouterr()
    leaks += [("log", s) for s in secrets if s in caplog.text or s in out or s in err]
    assert not leaks, leaks
    assert "SARLANG_TEST_OPENAI_KEY" in (run_dir / "config.yaml").read_text()  # the key's name, never the key


def _lines_of(path: Path, function: str) -> range:
    node = next(
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.FunctionDef) and n.name == function
    )
    return range(node.lineno, node.end_lineno + 1)


def test_s3_credentials_come_from_the_standard_chain_only():
    """No code passes keys to fsspec/s3fs/boto: credentials come from the environment / AWS config chain.

    One function names AWS credential variables: ``io.gdal_s3_options``, which hands GDAL's ``/vsis3/`` what
    s3fs itself resolved (its ``key``/``secret``/``client_kwargs``), so GDAL reaches the same storage with
    the same credentials; it reads them from the filesystem object only, never from config or literals."""
    pattern = re.compile(r"(aws_secret_access_key|aws_access_key_id|secret=|key=os\.environ)", re.IGNORECASE)
    bridge = _lines_of(PACKAGE / "io.py", "gdal_s3_options")
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in PACKAGE.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and not (p.name == "io.py" and i in bridge)
    ]
    assert not hits, hits
    body = "\n".join((PACKAGE / "io.py").read_text().splitlines()[bridge.start - 1 : bridge.stop - 1])
    assert "cfg" not in body and "environ" not in body and not re.search(r"AKIA|['\"]sk-", body)
