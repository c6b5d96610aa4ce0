"""
What every nanodoge script shares, once: errors and the entry point, atomic writes, token files, dataset rows
(local files and the hub), config parsing, devices and precision, and the learning-rate schedule. Plain
functions that import nothing else of the project (checkpoint.py, training.py and post_training.py build on
them).
"""
import os
import sys
import ast
import json
import math
import time
import difflib
import contextlib
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# errors and the entry point

def run(main):
    """Run a script's main(); a user error (ValueError, FileNotFoundError) is one line, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

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
        if resume:  # whatever was written after that state is dropped
            self.file = open(self.partial, "r+b")
            self.file.truncate(HEADER_INTS * 4 + self.count * self.dtype.itemsize)
            self.file.seek(0, os.SEEK_END)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.partial)), exist_ok=True)
            self.file = open(self.partial, "wb")
            self.file.write(bytes(HEADER_INTS * 4))  # the header's place; its count stays 0 until close()

    def append(self, array):
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.size:
            self.file.write(array.tobytes())
            self.count += array.size
            self.max = max(self.max, int(array.max()))

    def sync(self):
        """Flush the data to disk; returns the state to resume from."""
        self.file.flush()
        os.fsync(self.file.fileno())
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
# config: nanoGPT's recipe (defaults, then a Python config file, then --key=value), except that a key
# the script does not know or a value of the wrong type is an error instead of a silent new global

def load_config(defaults, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config = dict(defaults)
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep and key in defaults:  # --flag sets a boolean; --key value is --key=value
                if isinstance(defaults[key], bool):
                    text = "True"
                elif argv:
                    text = argv.pop(0)
                else:
                    raise ValueError(f"{arg}: give it a value, --{key}=VALUE")
            # a text setting keeps its text as typed (--prompt=12 is "12", not the number 12)
            value = text if isinstance(defaults.get(key), str) else _parse_value(text)
            _set_config(config, defaults, key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise FileNotFoundError(f"config file {arg} does not exist")
            namespace = {}
            exec(compile(open(arg).read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    _set_config(config, defaults, key, value, arg)
    return SimpleNamespace(**config)

def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --init_from=resume

def _set_config(config, defaults, key, value, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{source}: unknown config key '{key}'{hint}")
    default = defaults[key]
    if default is not None and value is not None:
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(default, bool) and isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float))
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"{source}: {key} must be {type(default).__name__}, got {value!r}")
    config[key] = value

def config_file(argv=None):
    """The config file named on a command line (the last one), or None."""
    argv = sys.argv[1:] if argv is None else argv
    files = [arg for arg in argv if not arg.startswith("--") and arg.endswith(".py")]
    return files[-1] if files else None

def require_prepared(data_dir, argv=None, offline_dir=None):
    """A one-line error, naming the command that makes it, when data_dir holds no prepared data: the command
    is `python prepare_data.py <the config file>` (which prepares what that config trains on), and the offline
    default offline_dir is named too when it is another directory."""
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        return
    config = config_file(argv)
    command = f"python prepare_data.py {config}" if config else "python prepare_data.py"
    if not config and data_dir != offline_dir:
        command += f" --out_dir={os.path.dirname(data_dir) or '.'} (with the settings that make {data_dir})"
    offline = "" if offline_dir in (None, data_dir) else \
        f", or offline: python prepare_data.py, then --data_dir={offline_dir}"
    raise FileNotFoundError(f"{data_dir} holds no prepared data: run {command}{offline}")

# -----------------------------------------------------------------------------
# devices, processes, precision

def setup_distributed(device="auto"):
    """One process, or one of many under torchrun (nccl on GPUs, gloo on CPUs; torchrun's own flags
    take it across nodes). Rank 0 is the master: it alone writes files and logs."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else \
                 "mps" if torch.backends.mps.is_available() else "cpu"
    rank, local_rank, world_size = 0, 0, 1
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size,
                           device=torch.device(device), master=rank == 0)

def cpu_has_native_bf16():
    """True where the CPU computes bfloat16 matmuls in hardware (AVX-512 BF16 or AMX), as inductor checks it."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

def native_dtype(device):
    """(the dtype the device trains fastest in, why): bf16 where it is computed in hardware, else fp16 with a
    GradScaler on a GPU, else float32 (a CPU without AVX-512 BF16 or AMX emulates bf16, many times slower)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "this GPU computes bf16"
        return "float16", "this GPU has no bf16: float16 with a GradScaler"
    if device.type == "mps":
        if torch.backends.mps.is_macos_or_newer(14, 0):
            return "bfloat16", "MPS computes bf16 from macOS 14"
        return "float32", "MPS before macOS 14 has no bf16"
    if cpu_has_native_bf16():
        return "bfloat16", "this CPU has bf16 instructions (AVX-512 BF16 or AMX)"
    return "float32", f"this CPU has no bf16 instructions ({torch.backends.cpu.get_cpu_capability()}): bf16 would be emulated"

def resolve_dtype(dtype, device):
    """(the training dtype to use, a line that says why): dtype="auto" is native_dtype's choice; an explicit
    bfloat16 on a device that emulates it is kept, with a warning; bf16 becomes fp16 on GPUs without it."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    native, why = native_dtype(device)
    if dtype == "auto":
        return native, f"dtype auto: {native} ({why})"
    if dtype == "bfloat16" and device.type == "cuda" and native == "float16":
        return "float16", f"dtype float16 instead of bfloat16 ({why})"
    if dtype == "bfloat16" and native == "float32":
        return dtype, f"warning: dtype bfloat16 asked for, but {why}: --dtype=auto picks float32"
    return dtype, f"dtype {dtype}"

def autocast(device, dtype):
    """Mixed precision for the forward pass: weights stay fp32, matmuls run in dtype."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))

def synchronize(device):
    """Wait for the device's queued work (GPU kernels run asynchronously: a timer must wait for them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

def measure_peak_flops(device, dtype, seconds=0.5):
    """The device's achievable matmul FLOP/s in dtype, measured (not a datasheet number): MFU's denominator.
    Back-to-back large matmuls (4096 on a GPU, 1024 on a CPU) timed together, so the launch latency of each is
    hidden as in a training step and the figure is what the device sustains."""
    size = 1024 if device.type == "cpu" else 4096
    torch_dtype = getattr(torch, dtype)
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    a @ b  # warm up
    synchronize(device)
    count, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        for _ in range(4):
            a @ b
        synchronize(device)
        count += 4
    return 2 * size ** 3 * count / (time.perf_counter() - begin)

# -----------------------------------------------------------------------------
# learning-rate schedules

def lr_at(step, max_steps, learning_rate, schedule="wsd", warmup_ratio=0.1, decay_ratio=0.1,
          min_lr_rate=0.0, decay_shape="linear"):
    """Warmup-stable-decay (linear warmup to the peak, constant, then decay to min_lr_rate x peak in the
    last decay_ratio of training; the decay is linear or 1-sqrt, arXiv 2405.18392), or warmup + cosine.
    WSD lets training continue from any stable-phase checkpoint: only the final decay is re-run."""
    warmup_steps = int(warmup_ratio * max_steps)
    min_lr = min_lr_rate * learning_rate
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr + (learning_rate - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule != "wsd":
        raise ValueError(f"schedule must be 'wsd' or 'cosine', got {schedule!r}")
    decay_start = max_steps - int(decay_ratio * max_steps)
    if step < decay_start:
        return learning_rate
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    if decay_shape == "linear":
        remaining = 1 - progress
    elif decay_shape == "sqrt":
        remaining = 1 - math.sqrt(progress)
    else:
        raise ValueError(f"decay_shape must be 'linear' or 'sqrt', got {decay_shape!r}")
    return min_lr + (learning_rate - min_lr) * remaining
