"""
Files nanodoge writes and reads: atomic writes (a file appears under its name complete or not at all), array
files (token ids, masks, offsets behind a header that a loader checks), ragged sets of examples, and .jsonl
sets read by index.
"""
import os
import json

import numpy as np

# -----------------------------------------------------------------------------
# atomic writes: a file appears under its final name complete or not at all

def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), then rename tmp_path to path (atomic on POSIX)."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        write_fn(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)

def write_file(path, data):
    """Write bytes or text to path atomically."""
    def write(tmp_path):
        with open(tmp_path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    atomic_write(path, write)

# -----------------------------------------------------------------------------
# binary arrays: a 256 x int32 header (magic, version, dtype code, count, largest value) then the raw data,
# so a loader rejects foreign and truncated files (the llm.c token-file idea), and a trainer checks the
# tokens against its vocabulary from the header instead of a pass over billions of them. Version 1 files
# (no largest value) stay readable.

ARRAY_MAGIC, ARRAY_VERSION, HEADER_INTS = 20241211, 2, 256
DTYPE_CODES = {np.dtype(np.uint16): 1, np.dtype(np.uint8): 2, np.dtype(np.int64): 3}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

def open_partial(partial, resume_bytes):
    """The unfinished file of a resumable writer, open for appending: a new one, or (resume_bytes) the one a
    sync() left, cut back to that many bytes (whatever was written after that state is dropped)."""
    if resume_bytes is None:
        os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
        return open(partial, "wb")
    file = open(partial, "r+b")
    file.truncate(resume_bytes)
    file.seek(0, os.SEEK_END)
    return file

def flush_to_disk(file):
    file.flush()
    os.fsync(file.fileno())

class ArrayWriter:
    """An array file written in chunks, for arrays larger than memory: append() as the data is made, close()
    writes the header (count and largest value, known only then) and renames the file into place, so a reader
    never meets a half file. Until then the data sits in `partial`, which sync() makes durable: a later
    ArrayWriter(path, partial, dtype, resume=sync()'s state) continues exactly where that state was taken."""

    def __init__(self, path, partial, dtype, resume=None):
        self.path, self.partial, self.dtype = str(path), str(partial), np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"cannot store dtype {self.dtype} in {path}: use uint16, uint8 or int64")
        self.count, self.max = (resume["count"], resume["max"]) if resume else (0, 0)
        self.file = open_partial(self.partial, HEADER_INTS * 4 + self.count * self.dtype.itemsize if resume else None)
        if not resume:
            self.file.write(bytes(HEADER_INTS * 4))  # the header's place; its count stays 0 until close()

    def append(self, array):
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.size:
            self.file.write(array.tobytes())
            self.count += array.size
            self.max = max(self.max, int(array.max()))

    def sync(self):
        """Flush the data to disk; returns the state to resume from."""
        flush_to_disk(self.file)
        return {"count": self.count, "max": self.max}

    def finish(self):
        """Write the header and close: `partial` is then a complete array file, under its temporary name."""
        self.file.seek(0)
        self.file.write(array_header(self.dtype, self.count, self.max).tobytes())
        self.sync()
        self.file.close()

    def close(self):
        self.finish()
        os.replace(self.partial, self.path)

    def discard(self):
        """Remove the partial file of an unfinished writer (nothing once closed)."""
        self.file.close()
        if os.path.exists(self.partial):
            os.remove(self.partial)

def array_header(dtype, count, largest):
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = ARRAY_MAGIC, ARRAY_VERSION, DTYPE_CODES[np.dtype(dtype)]
    header[3:5] = count & 0x7FFFFFFF, count >> 31  # count and largest value may exceed int32
    header[5:7] = largest & 0x7FFFFFFF, largest >> 31
    return header

def write_array(path, array):
    array = np.asarray(array)
    if array.dtype not in DTYPE_CODES:
        raise ValueError(f"cannot store dtype {array.dtype} in {path}: use uint16, uint8 or int64")
    writer = ArrayWriter(path, f"{path}.tmp{os.getpid()}", array.dtype)
    try:
        writer.append(array.ravel())
        writer.close()
    finally:
        writer.discard()

def read_header(path):
    """(version, dtype, count, largest value or None for version 1) of an array file; a one-line ValueError if
    it is foreign or truncated."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run `python prepare_data.py` first")
    file_size = os.path.getsize(path)
    if file_size < HEADER_INTS * 4:
        raise ValueError(f"{path} is too short to be a nanodoge array file (truncated or foreign)")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != ARRAY_MAGIC or header[1] not in (1, ARRAY_VERSION) or header[2] not in CODE_DTYPES:
        raise ValueError(f"{path} is not a nanodoge array file (bad magic/version): re-run prepare_data.py")
    dtype = CODE_DTYPES[int(header[2])]
    count = int(header[3]) + (int(header[4]) << 31)
    if file_size != HEADER_INTS * 4 + count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: header says {count} items, file holds "
                         f"{(file_size - HEADER_INTS * 4) // dtype.itemsize}; re-run prepare_data.py --force")
    largest = int(header[5]) + (int(header[6]) << 31) if header[1] >= 2 else None
    return int(header[1]), dtype, count, largest

def read_array(path):
    """Memory-map an array written by write_array; a one-line ValueError if it is foreign or truncated."""
    _, dtype, count, _ = read_header(path)
    return np.memmap(str(path), dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(count,))

def array_max_value(path):
    """The largest value an array file holds (0 if empty): what a training script compares with the model's
    vocabulary once per token file, from the header (one pass over a version-1 file)."""
    largest = read_header(path)[3]
    if largest is None:
        array = read_array(path)
        largest = int(array.max()) if len(array) else 0
    return largest

def write_ragged(prefix, examples):
    """Store variable-length (ids, mask) examples as flat arrays: tokens, mask, offsets (n+1) and each example's
    first target (first_targets); returns how many tokens. The examples may be a stream: they are written as
    they come."""
    writer = RaggedWriter(prefix, f"{prefix}.tmp{os.getpid()}")
    try:
        for ids, mask in examples:
            writer.append(ids, mask)
        writer.close()
    finally:
        writer.discard()
    return writer.tokens.count

def read_ragged(prefix):
    """(tokens, mask, offsets): example i is tokens[offsets[i]:offsets[i+1]]."""
    tokens, mask = read_array(f"{prefix}.tokens.bin"), read_array(f"{prefix}.mask.bin")
    offsets = read_array(f"{prefix}.offsets.bin")
    if len(tokens) != len(mask) or len(offsets) == 0 or offsets[-1] != len(tokens):
        raise ValueError(f"{prefix}.* do not belong together (token, mask and offset counts differ): "
                         "re-run prepare_data.py --force")
    return tokens, mask, offsets

def first_targets(prefix):
    """Per example, the position of its first loss target (mask 1 at a position >= 1; its length if none),
    recorded when it was written: an example truncated to max_len tokens has a target iff this is < max_len,
    known for a million examples without reading their masks."""
    path = f"{prefix}.first_target.bin"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {prefix} was written by an older prepare_data.py; "
                                "re-run it with --force")
    return read_array(path)

RAGGED_DTYPES = {"tokens": np.uint16, "mask": np.uint8, "offsets": np.int64, "first_target": np.int64}

class RaggedWriter:
    """write_ragged's four files, written in chunks (ArrayWriter) as examples come, into <partial>.tokens.bin
    etc. until close() renames them into place; a later RaggedWriter(prefix, partial, resume=sync()'s state)
    continues exactly where that state was taken."""

    def __init__(self, prefix, partial, resume=None):
        self.tokens, self.mask, self.offsets, self.first_target = (
            ArrayWriter(f"{prefix}.{name}.bin", f"{partial}.{name}.bin", dtype, resume=resume and resume[name])
            for name, dtype in RAGGED_DTYPES.items())
        if not resume:
            self.offsets.append([0])

    def writers(self):
        return self.tokens, self.mask, self.offsets, self.first_target

    def paths(self):
        """The final paths of its files."""
        return [writer.path for writer in self.writers()]

    def append(self, ids, mask):
        assert len(ids) == len(mask)
        self.tokens.append(ids)
        self.mask.append(mask)
        self.offsets.append([self.tokens.count])
        targets = np.flatnonzero(np.asarray(mask[1:])) + 1
        self.first_target.append([targets[0] if len(targets) else len(mask)])

    def sync(self):
        """Flush the four files to disk; returns the state to resume from."""
        return {name: writer.sync() for name, writer in zip(RAGGED_DTYPES, self.writers())}

    def finish(self):
        """Write the headers: the files are complete, under their unfinished names."""
        for writer in self.writers():
            writer.finish()

    def close(self):
        for writer in self.writers():
            writer.close()

    def discard(self):
        """Remove what an unfinished writer left (nothing once closed)."""
        for writer in self.writers():
            writer.discard()

def jsonl_index_path(path):
    return f"{path[:-len('.jsonl')]}.lines.bin"

class JsonlWriter:
    """Rows to a .jsonl file as they come, and where each line starts (JsonlRows reads row i without the rows
    before it), both written under `partial` (a .jsonl path) until finish() and then renamed into place; a later
    JsonlWriter(path, partial, resume=sync()'s state) continues exactly where that state was taken."""

    def __init__(self, path, partial, resume=None):
        self.path = path
        self.file = open_partial(partial, resume["bytes"] if resume else None)
        self.lines = ArrayWriter(jsonl_index_path(path), jsonl_index_path(partial), np.int64,
                                 resume=resume and resume["lines"])
        if not resume:
            self.lines.append([0])

    def paths(self):
        """The final paths of its files."""
        return [self.path, self.lines.path]

    def append(self, row):
        self.file.write((json.dumps(row) + "\n").encode())
        self.lines.append([self.file.tell()])

    def sync(self):
        """Flush the rows and the index to disk; returns the state to resume from."""
        flush_to_disk(self.file)
        return {"bytes": self.file.tell(), "lines": self.lines.sync()}

    def finish(self):
        """Both files complete, under their unfinished names."""
        self.sync()
        self.file.close()
        self.lines.finish()

class JsonlRows:
    """The rows of a .jsonl file that prepare_data.py wrote, read one at a time by index: opening it reads the
    line index (<name>.lines.bin), never the rows, so a million prompts open as fast as ten."""

    def __init__(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: run `python prepare_data.py` first")
        if not os.path.exists(jsonl_index_path(path)):
            raise FileNotFoundError(f"{jsonl_index_path(path)} does not exist: {path} was written by an older "
                                    "prepare_data.py; re-run it with --force")
        self.path, self.starts = path, read_array(jsonl_index_path(path))
        if self.starts[-1] != os.path.getsize(path):
            raise ValueError(f"{path} does not match its line index (truncated or edited): re-run prepare_data.py --force")
        self.file = open(path, "rb")

    def __len__(self):
        return len(self.starts) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        self.file.seek(int(self.starts[i]))
        return json.loads(self.file.read(int(self.starts[i + 1] - self.starts[i])))
