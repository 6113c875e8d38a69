"""``sarlang export-hf RUN_DIR|IMPORTED_TABLE OUT``: a dataset folder in the Hugging Face layout.

What ``datasets.load_dataset(OUT)`` and the Hub's dataset viewer read as they are, and what lmms-eval tasks
and most training frameworks consume:

* ``data/<split>-<k>-of-<n>.parquet``: Parquet shards per split (``train``, ``validation``, ``test``; our
  ``val`` is the Hub's ``validation``), each with the image in an ``image`` {bytes, path} column and the
  ``features`` metadata (``Image`` for ``image``) that makes ``datasets`` decode it to a PIL image;
* ``README.md``: the dataset card, with the YAML header the Hub reads (``configs``/``data_files`` per split,
  ``dataset_info`` features and split sizes, ``license``, ``task_categories``, ``pretty_name``), then the
  counts, the leakage report of the export (``export/leakage.json``; an imported table has none, said so) and
  the licence fields.

The source is a run folder (its ``export/parquet/<split>/*.parquet``: one output shard per export shard, rows
unchanged) or a pairs table written by ``sarlang import`` (its ``split`` column; the images read from
``image_uri`` or the embedded bytes, ``rows_per_shard`` rows per output shard). Both are streamed one shard at
a time: a split never sits in memory whole.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from sarlang_ray import io

HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # ours -> the Hub's split names
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_DTYPES = {
    pa.string(): "string",
    pa.float64(): "float64",
    pa.float32(): "float32",
    pa.int64(): "int64",
    pa.int32(): "int32",
    pa.bool_(): "bool",
}


def _feature(field: pa.Field) -> dict:
    if field.name == "image":
        return {"_type": "Image"}
    if pa.types.is_list(field.type) and field.type.value_type in _DTYPES:
        return {"feature": {"dtype": _DTYPES[field.type.value_type], "_type": "Value"}, "_type": "List"}
    return {"dtype": _DTYPES.get(field.type, "string"), "_type": "Value"}


def _with_features(table: pa.Table) -> pa.Table:
    features = {f.name: _feature(f) for f in table.schema}
    return table.replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    )


def _source_kind(src: str) -> str:
    if src.endswith(".parquet"):
        if not io.exists(src):
            raise FileNotFoundError(
                f"{src} does not exist: write a pairs table with `sarlang import RELEASE {src}`"
            )
        return "table"
    root = io.join(src, "export", "parquet")
    if io.exists(root) and io.glob(root, "*/*.parquet"):
        return "run"
    raise FileNotFoundError(
        f"{src} is neither a run folder with an export (export/parquet/<split>/*.parquet: run the "
        "export stage first) nor a pairs table (.parquet) written by `sarlang import`"
    )


def _run_shards(src: str):
    """(split, table) per export shard of a run, in order."""
    root = io.join(src, "export", "parquet")
    for split in HF_SPLITS:
        for uri in sorted(io.glob(root, f"{split}/*.parquet")):
            yield split, io.read_parquet(uri)


def _table_shards(src: str, rows_per_shard: int):
    """(split, table) of an imported pairs table, ``rows_per_shard`` rows at a time, images filled in."""
    import pyarrow.parquet as pq

    fs, path = io.filesystem(src)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f)
        splits = sorted(set(pc.unique(meta.read(columns=["split"])["split"]).to_pylist()) & set(HF_SPLITS))
    for split in sorted(splits, key=list(HF_SPLITS).index):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=rows_per_shard):
                t = pa.Table.from_batches([batch])
                t = t.filter(pc.equal(t["split"], split))
                if not t.num_rows:
                    continue
                images = []
                for uri, img, pid in zip(
                    t["image_uri"].to_pylist(), t["image"].to_pylist(), t["pair_id"].to_pylist()
                ):
                    if img and img.get("bytes"):
                        images.append(img)
                    elif uri:
                        images.append({"bytes": io.read_bytes(uri), "path": uri.rsplit("/", 1)[-1]})
                    else:
                        raise ValueError(
                            f"pair {pid} of {src} has neither an image_uri nor embedded image bytes"
                        )
                t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, IMAGE))
                yield split, t.drop_columns([c for c in ("image_uri", "file") if c in t.column_names])


def export_hf(
    src: str, out: str, *, license: str = "other", name: str | None = None, rows_per_shard: int = 1000
) -> dict:
    """Write the Hugging Face dataset folder ``out`` from ``src`` (a run folder or an imported pairs table).

    Returns the manifest: rows and shards per split, the files written.

    Raises:
        FileNotFoundError: ``src`` is neither (the message says what to run first).
        ValueError: a bad licence id, or a pair without an image.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", license):
        raise ValueError(
            f"--license {license!r} is not a Hub licence id (lowercase, e.g. cc-by-4.0, mit, other)"
        )
    kind = _source_kind(src)
    shards = _run_shards(src) if kind == "run" else _table_shards(src, rows_per_shard)
    staged: dict[str, list[str]] = {}  # split -> temporary shard uris, renamed once the count is known
    rows: dict[str, int] = {}
    schema = None
    for split, table in shards:
        table = _with_features(table)
        schema = schema or table.schema
        uri = io.join(out, "data", f"_{HF_SPLITS[split]}-{len(staged.get(split, [])):05d}.parquet")
        io.write_parquet_atomic(uri, table)
        staged.setdefault(split, []).append(uri)
        rows[split] = rows.get(split, 0) + table.num_rows
    if not staged:
        raise ValueError(f"{src} has no train, val or test rows to export")
    files: dict[str, list[str]] = {}
    for split, uris in staged.items():
        files[split] = []
        for k, uri in enumerate(uris):
            final = io.join(out, "data", f"{HF_SPLITS[split]}-{k:05d}-of-{len(uris):05d}.parquet")
            fs, path = io.filesystem(uri)
            fs.mv(path, io.filesystem(final)[1])
            files[split].append(final)
    leakage = None
    if kind == "run" and io.exists(io.join(src, "export", "leakage.json")):
        leakage = io.read_json(io.join(src, "export", "leakage.json"))
    card = dataset_card(name or _default_name(src), src, kind, schema, rows, license, leakage)
    io.write_bytes_atomic(io.join(out, "README.md"), card.encode())
    return {
        "out": out,
        "source": src,
        "kind": kind,
        "rows": {HF_SPLITS[s]: n for s, n in rows.items()},
        "shards": {HF_SPLITS[s]: len(u) for s, u in staged.items()},
        "readme": io.join(out, "README.md"),
    }


def _default_name(src: str) -> str:
    return src.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet") or "sarlang"


def card_header(schema: pa.Schema, rows: dict[str, int], license: str, name: str) -> dict:
    """The YAML header the Hub reads: configs/data_files per split, features, split sizes, licence, tasks."""
    features = []
    for f in schema:
        feat = _feature(f)
        if feat["_type"] == "Image":
            features.append({"name": f.name, "dtype": "image"})
        elif feat["_type"] == "List":
            features.append({"name": f.name, "sequence": feat["feature"]["dtype"]})
        else:
            features.append({"name": f.name, "dtype": feat["dtype"]})
    ordered = [s for s in HF_SPLITS if s in rows]
    return {
        "license": license,
        "pretty_name": name,
        "language": ["en"],
        "task_categories": ["visual-question-answering", "image-to-text"],
        "tags": ["sar", "remote-sensing", "sarlang-ray"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": HF_SPLITS[s], "path": f"data/{HF_SPLITS[s]}-*"} for s in ordered],
            }
        ],
        "dataset_info": {
            "features": features,
            "splits": [{"name": HF_SPLITS[s], "num_examples": rows[s]} for s in ordered],
        },
    }


def dataset_card(
    name: str,
    src: str,
    kind: str,
    schema: pa.Schema,
    rows: dict[str, int],
    license: str,
    leakage: dict | None,
) -> str:
    header = yaml.safe_dump(card_header(schema, rows, license, name), sort_keys=False, allow_unicode=True)
    lines = [
        "---",
        header.rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        (
            "SAR image-text pairs written by `sarlang export-hf` (sarlang-ray) from "
            f"{'the run' if kind == 'run' else 'the imported table'} "
            f'`{src}`. Load it with `datasets.load_dataset("<this folder or repo>")`: the `image` column '
            "decodes to PIL images."
        ),
        "",
        "| split | rows |",
        "|---|---|",
    ] + [f"| {HF_SPLITS[s]} | {n} |" for s, n in rows.items()]
    lines += ["", "## Leakage", ""]
    if leakage is None:
        lines.append(
            "No leakage report: "
            + (
                "this run's export has no `leakage.json`."
                if kind == "run"
                else "an imported release keeps its publisher's splits; sarlang-ray did not make them and "
                "cannot vouch "
                "that no ground is in two of them."
            )
        )
    else:
        lines.append(
            f"Splits by {leakage.get('split_by', '?')}: "
            f"{'no leakage measured' if leakage.get('leak_free') else '**LEAKS**'} "
            f"(ground shared by two splits, tiles within {leakage.get('buffer_m', '?')} m, label objects in "
            "two "
            "splits). The report as written by the export stage:"
        )
        lines += ["", "```json", json.dumps(leakage, indent=2, sort_keys=True, default=str), "```"]
    lines += [
        "",
        "## Licence",
        "",
        (
            f"`license: {license}` in the header above. The images derive from the SAR products the "
            "run catalogued (or the release imported): their own licences and attributions apply, and "
            "`license: other` means they must be read there before redistributing."
        ),
    ]
    return "\n".join(lines) + "\n"
