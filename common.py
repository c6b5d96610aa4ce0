"""
What the nanodoge scripts share, once: errors and the entry point, config parsing, token files,
distributed setup, the learning-rate schedule, checkpoints, and the evaluation every post-training
stage reports. Plain functions; each script writes its own loop from these pieces.
"""
import os
import sys
import numpy as np

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

# -----------------------------------------------------------------------------
# binary arrays: a 256 x int32 header (magic, version, dtype code, count) then the raw data,
# so a loader rejects foreign and truncated files (the llm.c token-file idea)

ARRAY_MAGIC, ARRAY_VERSION, HEADER_INTS = 20241211, 1, 256
DTYPE_CODES = {np.dtype(np.uint16): 1, np.dtype(np.uint8): 2, np.dtype(np.int64): 3}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

def write_array(path, array):
    array = np.ascontiguousarray(array)
    if array.dtype not in DTYPE_CODES:
        raise ValueError(f"cannot store dtype {array.dtype} in {path}: use uint16, uint8 or int64")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = ARRAY_MAGIC, ARRAY_VERSION, DTYPE_CODES[array.dtype]
    header[3:5] = array.size & 0x7FFFFFFF, array.size >> 31  # count may exceed int32

    def write(tmp_path):
        with open(tmp_path, "wb") as f:
            f.write(header.tobytes())
            f.write(array.tobytes())
    atomic_write(path, write)

def read_array(path):
    """Memory-map an array written by write_array; a one-line ValueError if it is foreign or truncated."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run `python prepare_data.py` first")
    file_size = os.path.getsize(path)
    if file_size < HEADER_INTS * 4:
        raise ValueError(f"{path} is too short to be a nanodoge array file (truncated or foreign)")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != ARRAY_MAGIC or header[1] != ARRAY_VERSION or header[2] not in CODE_DTYPES:
        raise ValueError(f"{path} is not a nanodoge array file (bad magic/version): re-run prepare_data.py")
    dtype = CODE_DTYPES[int(header[2])]
    count = int(header[3]) + (int(header[4]) << 31)
    if file_size != HEADER_INTS * 4 + count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: header says {count} items, file holds "
                         f"{(file_size - HEADER_INTS * 4) // dtype.itemsize}; re-run prepare_data.py --force")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(count,))

def write_ragged(prefix, examples):
    """Store variable-length (ids, mask) examples as three flat arrays: tokens, mask, offsets (n+1)."""
    tokens, masks, offsets = [], [], [0]
    for ids, mask in examples:
        assert len(ids) == len(mask)
        tokens.append(np.asarray(ids, dtype=np.uint16))
        masks.append(np.asarray(mask, dtype=np.uint8))
        offsets.append(offsets[-1] + len(ids))
    write_array(f"{prefix}.tokens.bin", np.concatenate(tokens) if tokens else np.zeros(0, np.uint16))
    write_array(f"{prefix}.mask.bin", np.concatenate(masks) if masks else np.zeros(0, np.uint8))
    write_array(f"{prefix}.offsets.bin", np.asarray(offsets, dtype=np.int64))

def read_ragged(prefix):
    """(tokens, mask, offsets): example i is tokens[offsets[i]:offsets[i+1]]."""
    tokens, mask = read_array(f"{prefix}.tokens.bin"), read_array(f"{prefix}.mask.bin")
    offsets = read_array(f"{prefix}.offsets.bin")
    if len(tokens) != len(mask) or len(offsets) == 0 or offsets[-1] != len(tokens):
        raise ValueError(f"{prefix}.* do not belong together (token, mask and offset counts differ): "
                         "re-run prepare_data.py --force")
    return tokens, mask, offsets
